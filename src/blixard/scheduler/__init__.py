"""Blixard layer: scheduler (see docs/architecture.md). Pure: no I/O, imports only domain.

* ``placement``: ``place()``, the entry point, and the interface types re-exported;
* ``interface``: NodeView, Request, Decision, the Filter and Weigher protocols;
* ``filters``, ``constraints``: the hard rules and why they refuse a node;
* ``weighers``, ``labels``: the soft preferences and the node labels they read;
* ``strategies``: which weighers, with which factors, for a request;
* ``sampling``: the ``limit`` (how many feasible nodes to score, in which order);
* ``compiled``: a request's facts, derived once per placement;
* ``reasons``: the text users read in ``vm status``.
"""
