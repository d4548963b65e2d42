"""What a user reads about a job, from the output alone: its state (outcome), `imagemill status`,
`report.json`/`report.html` with its dataset section, and the contact sheet.
"""
