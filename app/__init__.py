"""hparena's HTTP service: competitions, teams, submissions, runs and the leaderboard."""
