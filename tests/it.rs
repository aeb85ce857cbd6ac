//! Integration tests over real sockets: one binary, one module per topic.

mod util;

mod cluster;
mod config_doc;
mod dispatch;
mod etcd;
mod lifecycle;
mod malformed;
mod pomelo;
mod protocol;
mod sample_game;
mod sessions;
mod tidy;
