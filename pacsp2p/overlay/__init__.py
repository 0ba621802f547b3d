"""The overlay: the network between peers.

Mutual-TLS links signed by the cluster's own CA (``tls``), AMP control commands declared
in one module (``commands``), membership with phi-accrual failure detection
(``membership``, ``detector``), the HTTPS bulk channel for instance bytes and catalog
facts (``bulk``), and anti-entropy catalog sync (``sync``).
"""
