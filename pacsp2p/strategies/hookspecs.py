"""The strategy hooks: every hook a site plugin may implement, each a documented function.

A plugin is any module or object with functions named like these hooks, marked with
``@pacsp2p.strategies.hookimpl``; it takes part only when the peer's config names it
(``[strategies] plugins``). Built-in strategies are registered exactly like a site's
plugins. Every hook but ``pacsp2p_configure`` is ``firstresult``: implementations are
asked in turn (the enabled plugins in config order, then the built-in the role names)
until one returns something other than ``None`` — so a site plugin decides the cases it
cares about and returns ``None`` for the rest.

Which built-in answers is chosen in config (``[strategies] placement = "rendezvous"``);
see docs/strategies.md for where each hook is called and a runnable example of each.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("pacsp2p")
hookimpl = pluggy.HookimplMarker("pacsp2p")     # also importable as pacsp2p.strategies.hookimpl


@hookspec
def pacsp2p_configure(options, peer):
    """Called once when the peer starts (and by ``pacsp2p check-config``), before any
    other hook.

    :param options: the plugin's own table ``[strategies.options.<its name>]`` (a dict,
        empty if the config has none); its name is its entry-point name, or a plugin
        file's ``name`` (the file name without ``.py`` if it has none).
    :param peer: the peer's name.
    Raise ``ValueError`` with a clear message for bad options: the peer will not start.
    """


@hookspec(firstresult=True)
def pacsp2p_place(instance, archives, replicas):
    """Choose the archives that keep a new instance, best first. Called by the ingest
    (``transfer/ingest.py: Ingest.rank``) once per instance stored at this peer's facade,
    as its first bytes arrive.

    :param instance: :class:`pacsp2p.types.InstanceInfo` — UIDs, modality, size, header.
    :param archives: list of :class:`pacsp2p.types.ArchiveInfo` — every archive the
        cluster knows, alive or not (``alive`` says which), with site labels and counts.
    :param replicas: how many copies the cluster keeps (``[cluster] replicas``).
    :return: the archives in order of preference, or ``None`` to let the next
        implementation decide. The instance is written to the first *replicas* of them
        that are alive; the rest are fall-backs, in order, for archives that are down or
        fail. A preferred archive that was down gets its copy when it returns (hinted
        hand-off). Return *all* acceptable archives, not just *replicas* of them.
        The built-ins order them by the rule of distinct copies
        (:func:`pacsp2p.strategies.placement.distinct`: distinct peers, then distinct
        archives of one peer, then distinct sites); a plugin's order replaces the rule
        and is kept as it is (``[strategies] first_copy = "auto"`` puts the receiving
        peer's archive first only where the built-in rendezvous or site-aware ranked).
    """


@hookspec(firstresult=True)
def pacsp2p_rank_replicas(instance, locations, reader):
    """Order the replicas of an instance for a reader, best source first. Called by every
    read (``transfer/retrieve.py: Retrieval.start``, C-MOVE and C-GET, relayed or
    direct) once per instance, with the replicas the reader can reach now.

    The order is used everywhere: ``balancing = "single"`` reads each instance from the
    first; work stealing gives each source first the instances that rank it highest;
    failover (a source that dies or lacks the file) goes down the order.

    :param instance: :class:`pacsp2p.types.InstanceRef` being retrieved.
    :param locations: list of reachable :class:`pacsp2p.types.Location` (``peer``,
        ``archive``, ``sha256``, ``size``), one per archive holding it.
    :param reader: :class:`pacsp2p.types.PeerInfo` of the peer that retrieves (``name``,
        ``site``: the site label of its archives, if any).
    :return: the locations in order of preference, or ``None``. Locations left out
        follow the ranked ones (a ranking never makes a replica unreadable).
    """


@hookspec(firstresult=True)
def pacsp2p_next_batch(plan, source):
    """Hand a source that has become free its next batch of instances. Called by a
    running retrieval (``transfer/retrieve.py: Retrieval._schedule``) for each source
    (one archive of one peer) with room for more fetches, whenever a fetch ends.

    :param plan: the running retrieval's plan view: ``pending`` (instance refs nobody
        has claimed, in order), ``in_flight`` (uid -> sources fetching it), ``done``,
        ``holders`` (uid -> live sources holding it), ``ranked(uid)`` (those, best first,
        as replica selection ranked them), ``sources``, ``avg_size``, ``memo``.
    :param source: the source's stats: ``name`` ("peer/archive"), ``peer``, ``archive``,
        ``limit`` (fetches at once at most), ``rate`` (bytes/s measured so far),
        ``in_flight``, ``completed``, ``failed``, and the set of instance UIDs it
        ``holds``.
    :return: a list of instance refs for that source to fetch next (empty: none for it
        now), or ``None``.
    """
