"""Example site plugin: keep every instance of some modalities at one site.

A breast centre may want all mammography (MG) on the archives of its own building, while
everything else is spread over the whole cluster. Enable it in a peer's config (its name
is ``pin-modality``, below: its options table is named after it):

    [strategies]
    plugins = ["plugins/pin_modality.py"]

    [strategies.options.pin-modality]
    MG = "breast-centre"            # modality = site label of the archives to use

and label archives with ``site = "breast-centre"`` in their ``[[archives]]`` blocks.
Instances of other modalities are left to the configured built-in strategy (this plugin
returns ``None`` for them). If no archive carries the site, the C-STORE fails with a
clear error instead of quietly storing elsewhere.
"""

from pacsp2p.strategies import hookimpl
from pacsp2p.strategies.placement import distinct

name = "pin-modality"
PINS: dict[str, str] = {}


@hookimpl
def pacsp2p_configure(options, peer):
    # options: this plugin's own table, [strategies.options.pin-modality]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()):
        raise ValueError("pin-modality maps modality names to site labels (strings)")
    PINS.clear()
    PINS.update(options)


@hookimpl
def pacsp2p_place(instance, archives, replicas):
    site = PINS.get(instance.modality)
    if site is None:
        return None                       # not ours: the next strategy decides
    pinned = [a for a in archives if a.site == site]
    if not pinned:
        raise ValueError(f"modality {instance.modality} is pinned to site {site!r} "
                         "but no archive carries that site label")
    # distinct peers, then distinct archives, then distinct sites, as the built-ins do
    return distinct(sorted(pinned, key=lambda a: (a.instances, a.peer, a.name)))
