"""Policy bodies the tests publish, one name per content (`Rig.publish` fills in {d}, the domain).

Names say what a body is; a module that needs a body of its own for one test defines it beside
that test under a name of its own, never under one of these.
"""

# The default of Rig.publish: enforce, mx1.{d} and the wildcard *.mx.{d} (publish's MX hosts are
# mx1.{d} and a.mx.{d}, both covered; conftest.secure() is its Postfix answer).
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 86400\n"
# Enforce naming mx1.{d} alone: a.mx.{d}, publish's other MX host, is not covered.
ENFORCE_ONE_MX = "version: STSv1\nmode: enforce\nmx: mx1.{d}\nmax_age: 86400\n"
# Testing, with the same MX patterns as ENFORCE.
TESTING = "version: STSv1\nmode: testing\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 86400\n"
# Testing naming mx1.{d} alone.
TESTING_ONE_MX = "version: STSv1\nmode: testing\nmx: mx1.{d}\nmax_age: 86400\n"
# Testing as TESTING, kept for a week.
TESTING_WEEK = "version: STSv1\nmode: testing\nmx: mx1.{d}\nmx: *.mx.{d}\nmax_age: 604800\n"
# Testing, valid, with two parser warnings (an indented key, a trailing comment).
TESTING_TWO_WARNINGS = "version: STSv1\nmode: testing\n  mx: mx1.{d}\nmx: mx2.{d} # old\nmax_age: 604800\n"
NONE = "version: STSv1\nmode: none\nmax_age: 86400\n"
