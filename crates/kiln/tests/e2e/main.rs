//! End-to-end tests of the real `kiln` binary: a server started as a child process on a free port with its own
//! data directory, driven by the CLI, curl-like HTTP, PostgreSQL and headless Chromium where the test needs them.

mod harness;

mod apps;
mod cli;
mod connect;
mod console;
mod delivery;
mod dependencies;
mod docker;
mod durability;
mod logs;
mod pipelines;
mod provisioners;
mod runners;
mod smoke;
mod ssh;
mod tasks;
mod triggers;
mod workspaces;
