"""swarm_peer: peer-to-peer decentralized pipeline training of transformer LMs on hivemind."""
__version__ = "0.1.0"
