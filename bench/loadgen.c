/* Socketmap load generator for bench/run.py: epoll, raw netstrings, one outstanding request per
 * connection (as Postfix does). Written in C so that the client costs little CPU next to the
 * daemon under test on a small machine; bench/run.py compiles it with `cc -O2` at run time and
 * falls back to its Python (asyncio) client when no compiler is there.
 *
 * usage: loadgen PORT CONNECTIONS MODE RAMP DURATION TIMEOUT KEYFILE
 *   MODE "loop": every connection cycles through the keys from its own offset; replies that arrive
 *                in [RAMP, RAMP+DURATION) count; then the run stops.
 *   MODE "once": each key exactly once, dealt round-robin over the connections; ends when all are
 *                answered (or TIMEOUT).
 *   KEYFILE: one key per line, "P domain" (expects "OK secure match=...") or "N domain"
 *            (expects "NOTFOUND "), already shuffled.
 * Prints one JSON object with the same fields as the Python client.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    long next;       /* loop: index into the cycle; once: next key of this connection's share */
    long current;    /* key being answered */
    double sent_at;
    char buf[4096];
    int len;
    int done;
} conn_t;

static char **frames;
static int *frame_len;
static char **domains;
static char *expect;
static long nkeys;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, long n, double q) {
    if (n == 0) return -1;
    long i = (long)(q * (n - 1) + 0.5);
    if (i >= n) i = n - 1;
    return v[i];
}

static void json_str(const char *s, int n) {
    putchar('"');
    for (int i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 32 || c > 126) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: loadgen PORT CONNECTIONS loop|once RAMP DURATION TIMEOUT KEYFILE\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int nconn = atoi(argv[2]);
    int once = strcmp(argv[3], "once") == 0;
    double ramp = atof(argv[4]), duration = atof(argv[5]), timeout = atof(argv[6]);

    FILE *f = fopen(argv[7], "r");
    if (!f) { perror("keyfile"); return 2; }
    long cap = 1024;
    frames = malloc(cap * sizeof *frames); frame_len = malloc(cap * sizeof *frame_len);
    domains = malloc(cap * sizeof *domains); expect = malloc(cap);
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        size_t l = strcspn(line, "\r\n");
        line[l] = 0;
        if (l < 3) continue;
        if (nkeys == cap) {
            cap *= 2;
            frames = realloc(frames, cap * sizeof *frames); frame_len = realloc(frame_len, cap * sizeof *frame_len);
            domains = realloc(domains, cap * sizeof *domains); expect = realloc(expect, cap);
        }
        expect[nkeys] = line[0] == 'P';
        domains[nkeys] = strdup(line + 2);
        char req[1100];
        int rl = snprintf(req, sizeof req, "postfix %s", line + 2);
        frames[nkeys] = malloc(rl + 16);
        frame_len[nkeys] = sprintf(frames[nkeys], "%d:%s,", rl, req);
        nkeys++;
    }
    fclose(f);
    if (nkeys == 0) { fprintf(stderr, "no keys\n"); return 2; }

    long lat_cap = 1 << 20, lat_n = 0;
    double *lat = malloc(lat_cap * sizeof *lat);
    long total = 0, wrong = 0, nexamples = 0;
    char examples[3][200]; int example_len[3];

    int ep = epoll_create1(0);
    conn_t *conns = calloc(nconn, sizeof *conns);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    int active = 0;
    long step = nkeys / nconn > 0 ? nkeys / nconn : 1;
    for (int c = 0; c < nconn; c++) {
        conn_t *k = &conns[c];
        if (once && c >= nkeys) { k->done = 1; k->fd = -1; continue; }
        k->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (k->fd < 0 || connect(k->fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("connect"); return 1; }
        int one = 1;
        setsockopt(k->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        k->next = once ? c : (c * step) % nkeys;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)c};
        epoll_ctl(ep, EPOLL_CTL_ADD, k->fd, &ev);
        active++;
    }

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    double start = now(), win0 = start + ramp, win1 = start + ramp + duration, deadline = start + timeout;
    double last_reply = start;
    int stopping = 0;
    char errbuf[200] = "";

#define SEND_NEXT(k) do { \
        if (stopping || (once && (k)->next >= nkeys)) { (k)->done = 1; active--; } \
        else { \
            long key_ = once ? (k)->next : (k)->next % nkeys; \
            (k)->next += once ? nconn : 1; \
            (k)->current = key_; (k)->sent_at = now(); \
            if (write((k)->fd, frames[key_], frame_len[key_]) != frame_len[key_]) { \
                snprintf(errbuf, sizeof errbuf, "short write: %s", strerror(errno)); (k)->done = 1; active--; } \
        } } while (0)

    for (int c = 0; c < nconn; c++)
        if (!conns[c].done) SEND_NEXT(&conns[c]);

    struct epoll_event events[256];
    while (active > 0) {
        double t = now();
        if (!once && !stopping && t >= win1) stopping = 1;
        if (t >= deadline) { snprintf(errbuf, sizeof errbuf, "TimeoutError: %d connections still waiting", active); break; }
        int wait_ms = 50;
        int n = epoll_wait(ep, events, 256, wait_ms);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            conn_t *k = &conns[events[i].data.u32];
            if (k->done) continue;
            ssize_t r = read(k->fd, k->buf + k->len, sizeof k->buf - 1 - k->len);
            if (r <= 0) {
                snprintf(errbuf, sizeof errbuf, "ConnectionError: server closed a connection (%s)",
                         r < 0 ? strerror(errno) : "EOF");
                k->done = 1; active--; continue;
            }
            k->len += (int)r;
            k->buf[k->len] = 0;
            char *colon = memchr(k->buf, ':', k->len);
            if (!colon) continue;
            long dlen = strtol(k->buf, NULL, 10);
            long end = (colon - k->buf) + 1 + dlen;
            if (k->len <= end) continue;
            double t2 = now();
            char *reply = colon + 1;
            int ok = expect[k->current]
                ? (dlen >= 16 && memcmp(reply, "OK secure match=", 16) == 0)
                : (dlen == 9 && memcmp(reply, "NOTFOUND ", 9) == 0);
            total++;
            last_reply = t2;
            if (!ok) {
                wrong++;
                if (nexamples < 3) {
                    int m = snprintf(examples[nexamples], 200, "%s -> %.*s", domains[k->current],
                                     (int)(dlen > 120 ? 120 : dlen), reply);
                    example_len[nexamples++] = m > 199 ? 199 : m;
                }
            }
            if (once || (t2 >= win0 && t2 < win1)) {
                if (lat_n == lat_cap) { lat_cap *= 2; lat = realloc(lat, lat_cap * sizeof *lat); }
                lat[lat_n++] = t2 - k->sent_at;
            }
            long rest = k->len - (end + 1);
            if (rest > 0) memmove(k->buf, k->buf + end + 1, rest);
            k->len = (int)rest;
            if (!once && t2 >= win1) stopping = 1;
            SEND_NEXT(k);
        }
    }
    double end_t = now();
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6
               + (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    for (int c = 0; c < nconn; c++) if (conns[c].fd > 0) close(conns[c].fd);
    qsort(lat, lat_n, sizeof *lat, cmp_double);
    double elapsed = once ? last_reply - start : duration;
    long counted = once ? total : lat_n;
    printf("{\"counted\": %ld, \"elapsed\": %.6f, \"rate\": %.3f, \"total\": %ld, \"wall\": %.6f, "
           "\"client_cpu\": %.6f, \"p50\": %.6f, \"p90\": %.6f, \"p99\": %.6f, \"max\": %.6f, \"wrong\": %ld, "
           "\"examples\": [",
           counted, elapsed, elapsed > 0 ? counted / elapsed : 0.0, total, end_t - start, cpu,
           pct(lat, lat_n, 0.50) * 1e3, pct(lat, lat_n, 0.90) * 1e3, pct(lat, lat_n, 0.99) * 1e3,
           lat_n ? lat[lat_n - 1] * 1e3 : -1.0, wrong);
    for (int i = 0; i < nexamples; i++) {
        if (i) printf(", ");
        json_str(examples[i], example_len[i]);
    }
    printf("], \"error\": ");
    if (errbuf[0]) json_str(errbuf, (int)strlen(errbuf)); else printf("null");
    printf("}\n");
    return 0;
}
