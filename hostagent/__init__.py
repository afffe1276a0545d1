"""cumulo-agent: the host agent, one per hypervisor node; acts only on objects bound to its host."""
