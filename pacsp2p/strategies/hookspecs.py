"""The strategy hooks: every hook a site plugin may implement, each a documented function.

A plugin is any module or object with functions named like these hooks, marked with
``@pacsp2p.strategies.hookimpl``. Built-in strategies are registered exactly like a
site's plugins. Every hook is ``firstresult``: implementations are called newest first
(site plugins before built-ins) until one returns something other than ``None`` — so a
site plugin decides the cases it cares about and returns ``None`` for the rest.

Which built-in answers is chosen in config (``[strategies] placement = "rendezvous"``);
see docs/strategies.md for a runnable example.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("pacsp2p")
hookimpl = pluggy.HookimplMarker("pacsp2p")     # also importable as pacsp2p.strategies.hookimpl


@hookspec
def pacsp2p_configure(options, peer):
    """Called once when the peer starts, before any other hook.

    :param options: the ``[strategies.options]`` table of the peer's config (a dict; a
        plugin conventionally reads its own sub-table, e.g. ``options["pin_modality"]``).
    :param peer: the peer's name.
    Raise ``ValueError`` with a clear message for bad options: the peer will not start.
    """


@hookspec(firstresult=True)
def pacsp2p_place(instance, archives, replicas):
    """Choose the archives that keep a new instance, best first.

    :param instance: :class:`pacsp2p.types.InstanceInfo` — UIDs, modality, size, header.
    :param archives: list of :class:`pacsp2p.types.ArchiveInfo` — every archive the
        cluster knows, alive or not (``alive`` says which), with site labels and counts.
    :param replicas: how many copies the cluster keeps (``[cluster] replicas``).
    :return: the archives in order of preference, or ``None`` to let the next
        implementation decide. The instance is written to the first *replicas* of them
        that are alive; the rest are fall-backs, in order, for archives that are down or
        fail. A preferred archive that was down gets its copy when it returns (hinted
        hand-off). Return *all* acceptable archives, not just *replicas* of them.
    """


@hookspec(firstresult=True)
def pacsp2p_rank_replicas(instance, locations, reader):
    """Order the replicas of an instance for a reader, best source first.

    :param instance: :class:`pacsp2p.types.InstanceRef` being retrieved.
    :param locations: list of available :class:`pacsp2p.types.Location`.
    :param reader: :class:`pacsp2p.types.PeerInfo` of the peer that retrieves.
    :return: the locations in order of preference, or ``None``.
    """


@hookspec(firstresult=True)
def pacsp2p_next_batch(plan, source):
    """Hand a source that has become free its next batch of instances.

    :param plan: the running retrieval's plan view: ``pending`` (instance refs nobody
        has claimed, in order), ``in_flight`` (ref -> sources fetching it), ``done``.
    :param source: the source's stats: ``name``, ``rate`` (bytes/s measured so far),
        ``completed``, ``failed``, and the set of instance UIDs it ``holds``.
    :return: a list of instance refs for that source to fetch next (empty: none for it
        now), or ``None``.
    """
