//! `atomic-worker`: the inference worker. The model runtime is built under its own issue; until then
//! the binary only reports that it is not implemented, so no deployment mistakes it for a worker.

fn main() {
    eprintln!("atomic-worker: the inference runtime is not built yet (see the worker issue)");
    std::process::exit(2);
}
