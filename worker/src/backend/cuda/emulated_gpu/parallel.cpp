// The emulated GPU's host threads: a launch's blocks (and a product's columns) are split into
// ranges that the calling thread and a few helper threads take in turn, so that the emulator uses
// the machine's cores as a GPU uses its multiprocessors. One job runs at a time (the library's
// calls are serialised by its lock anyway); the helpers sleep between jobs.
//
// ATOMIC_EMULATED_GPU_THREADS sets how many threads share a job (the caller included): the
// cores the process may use by default (at most 16), 1 to run every block on the calling thread.

#include "emulated_gpu.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

unsigned configured_threads() {
    if (const char* text = std::getenv("ATOMIC_EMULATED_GPU_THREADS")) {
        char* end = nullptr;
        const long n = std::strtol(text, &end, 10);
        if (end != text && *end == '\0' && n >= 1 && n <= 256) {
            return (unsigned)n;
        }
        emulated_gpu::report(std::string("ATOMIC_EMULATED_GPU_THREADS=") + text +
                             " is not a thread count from 1 to 256; using the core count");
    }
    // The cores this process may run on (its affinity, which a container's cpuset narrows),
    // at most 16: a pool's helpers each keep fibers for every kernel library they run.
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    const int usable = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
    return (unsigned)std::clamp(usable, 1, 16);
}

// A job is published under `m` and its ranges are claimed through `next`; `busy` counts the
// helpers inside the current job, so a new job is not published until the last one has left.
// A helper that wakes after a job ended claims nothing (`next` is past its end) and leaves.
class Pool {
  public:
    explicit Pool(unsigned helpers) {
        for (unsigned i = 0; i < helpers; ++i) {
            std::thread([this] { help(); }).detach();
        }
        threads_ = helpers + 1;
    }

    void run(uint64_t count, const std::function<void(uint64_t, uint64_t)>& body) {
        if (count == 0) {
            return;
        }
        // Four ranges a thread, so that uneven blocks (a causal mask's, say) even out.
        const uint64_t ranges = std::min<uint64_t>(count, (uint64_t)threads_ * 4);
        if (threads_ == 1 || ranges == 1) {
            body(0, count);
            return;
        }
        std::lock_guard<std::mutex> one_job(job_);
        {
            std::unique_lock<std::mutex> l(m_);
            left_.wait(l, [this] { return busy_ == 0; });
            body_ = &body;
            count_ = count;
            step_ = (count + ranges - 1) / ranges;
            next_.store(0);
            ++job_id_;
        }
        wake_.notify_all();
        take();
        std::unique_lock<std::mutex> l(m_);
        left_.wait(l, [this] { return busy_ == 0; });
    }

  private:
    void take() {
        for (;;) {
            const uint64_t first = next_.fetch_add(step_);
            if (first >= count_) {
                return;
            }
            (*body_)(first, std::min(count_, first + step_));
        }
    }

    [[noreturn]] void help() {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> l(m_);
                wake_.wait(l, [&] { return job_id_ != seen; });
                seen = job_id_;
                ++busy_;
            }
            take();
            std::lock_guard<std::mutex> l(m_);
            if (--busy_ == 0) {
                left_.notify_all();
            }
        }
    }

    unsigned threads_ = 1;
    std::mutex job_, m_;
    std::condition_variable wake_, left_;
    const std::function<void(uint64_t, uint64_t)>* body_ = nullptr;
    uint64_t count_ = 0, step_ = 1, job_id_ = 0;
    unsigned busy_ = 0;
    std::atomic<uint64_t> next_{0};
};

} // namespace

namespace emulated_gpu {

void parallel_ranges(uint64_t count, const std::function<void(uint64_t, uint64_t)>& body) {
    // Never destroyed: its helpers sleep in it until the process ends.
    static Pool* pool = new Pool(configured_threads() - 1);
    pool->run(count, body);
}

} // namespace emulated_gpu
