"""What a decision means for an MTA: Postfix TLS policy text (Exim's replies live with its front end)."""
