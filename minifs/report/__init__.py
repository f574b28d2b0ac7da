"""`minifs report`: bench results turned into plots, an HTML page, a terminal
summary and findings in words. matplotlib is imported only by `plots`, and
only when the command runs, so no other command pays for it."""
