"""Kubernetes API access shared by cumulo-controller and cumulo-agent: raw JSON requests over the ``kubernetes``
client (:mod:`kubewatch.client`) and the list+watch loop both sides build their informers on
(:mod:`kubewatch.listwatch`).

A package of its own because the agent may import nothing of ``controllers`` but the API models, and the
controller's runtime should not import the agent; it imports nothing else of Cumulo (import-linter contract).
"""
