//! `replica-router-gateway`: the OpenAI-compatible gateway binary (see the crate docs for the flags).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    replica_router_gateway::cli::main_with_args(std::env::args().skip(1))
}
