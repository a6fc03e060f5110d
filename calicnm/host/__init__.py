"""This host's kernel: netlink (veths, routes, tunnels), sysctls, iptables,
ipsets, and the applier that is the one writer of calicnm's chains and
ipsets.  Each module here is the only one that drives its tool or library."""
