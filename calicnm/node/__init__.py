"""One host's calicnm node: the daemon that starts and supervises
everything, the agent (Felix's role), child processes, learning Docker
network names, and diagnostics."""
