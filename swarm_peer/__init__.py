"""swarm_peer: peer-to-peer decentralized pipeline training of transformer LMs on hivemind."""
import os as _os

__version__ = "0.1.0"

# Shared tensors (the averaging buffers, DiLoCo's outer state) as unlinked memory held by file descriptors, not
# hivemind's default of named /dev/shm files: those outlive a peer killed with kill -9 (or by the OOM killer) and
# keep their RAM until reboot. Must be set before hivemind is imported; one descriptor per shared tensor.
_os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
try:
    import resource as _resource

    _soft, _hard = _resource.getrlimit(_resource.RLIMIT_NOFILE)
    _want = 65536 if _hard == _resource.RLIM_INFINITY else min(_hard, 65536)
    if _soft != _resource.RLIM_INFINITY and _soft < _want:
        _resource.setrlimit(_resource.RLIMIT_NOFILE, (_want, _hard))
except (ImportError, ValueError, OSError):  # not Linux/macOS, or not allowed: the default limit
    pass
