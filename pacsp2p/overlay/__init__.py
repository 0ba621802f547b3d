"""The overlay: the network between peers.

Mutual-TLS links signed by the cluster's own CA (``tls``), AMP control commands declared
in one module (``commands``), membership and failure detection by SWIM with the
Lifeguard refinements (``swim``: the transport-agnostic core; ``membership``: its AMP
transport and bounded link pool), epidemic dissemination of catalog facts
(``dissemination``) pulled in batches (``sync``), and the HTTPS bulk channel for
instance bytes and catalog facts (``bulk``).
"""
