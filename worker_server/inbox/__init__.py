"""The web inbox for human workers: tasks, questions, hand-ins, approvals, audit.

``app`` (routes, mounting, serving), ``accounts`` (people, sign-in links, web
sessions), ``security`` (headers, cookie, CSRF), ``rendering`` (Markdown and
HTML through nh3), ``views`` (what the pages show), ``templates/`` and
``static/``.
"""
