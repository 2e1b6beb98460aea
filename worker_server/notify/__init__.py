"""Notifications: tell people when something waits for them, where they are.

- ``outbox``   — the durable queue (a table in the same database): a
  notification is queued in the transaction that causes it;
- ``events``   — which changes notify whom (the hooks the store and the
  guard call inside their transactions, and the timed ones: an approval
  about to expire, an escalation);
- ``channels`` — webhook (signed JSON, Slack-compatible) and e-mail (SMTP);
- ``delivery`` — the daemon's loop that sends what is due, with retries;
- ``links``    — signed one-click decision links for approvers.
"""
