"""Drivers of the host agent: one Protocol per area (hypervisor, network, storage), each with a real
implementation and a simulator implementation of the same interface."""
