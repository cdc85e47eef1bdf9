//! Outpost's hub: the QUIC sync server, its storage and the head-office API.
