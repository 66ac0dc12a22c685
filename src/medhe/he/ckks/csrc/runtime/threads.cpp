// A small sleeping thread pool for data-parallel loops over RNS limbs.
//
// Workers block on a condition variable between jobs and never spin: with the other core busy, a spinning pool
// steals the time the caller needs (measured 30x slower with OpenMP's active wait). The caller takes indices too,
// so a job finishes even if no worker gets scheduled; nested loops run inline.
//
// A job ends only when every index is done *and* no worker is still inside it. Without the second condition a
// worker woken for one job but scheduled late could run on into the next one: it fetched an index past the old
// job's end, then compared it against the new job's larger count and ran that index a second time, so the done
// count overshot and the caller waited forever (seen as a hung Ray actor), or an in-place limb operation ran twice.
// Workers therefore join a job under the lock, work on the job's own count and function, and leave under the lock.
#include <condition_variable>
#include <thread>

#include "runtime.h"

namespace medhe {

namespace {

class Pool {
public:
    ~Pool() { resize(0); }

    void resize(int workers) {
        std::unique_lock<std::mutex> job_lock(job_mu_);  // never while a job runs
        if (workers == int(threads_.size())) return;
        {
            std::unique_lock<std::mutex> lock(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : threads_) t.join();
        threads_.clear();
        stop_ = false;
        for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
    }

    int workers() const { return int(threads_.size()); }

    void run(std::size_t count, const std::function<void(std::size_t)>& fn) {
        std::unique_lock<std::mutex> job_lock(job_mu_);  // one job at a time (concurrent callers queue)
        {
            std::unique_lock<std::mutex> lock(mu_);
            fn_ = &fn;
            count_ = count;
            next_.store(0);
            done_ = 0;
            ++generation_;
        }
        cv_.notify_all();
        std::size_t mine = work(count, fn);
        std::unique_lock<std::mutex> lock(mu_);
        done_ += mine;
        done_cv_.wait(lock, [&] { return done_ == count_ && inside_ == 0; });
        fn_ = nullptr;  // under the lock: a worker waking from now on sees no job and sleeps on
        if (error_) {
            auto e = error_;
            error_ = nullptr;
            std::rethrow_exception(e);
        }
    }

private:
    std::size_t work(std::size_t count, const std::function<void(std::size_t)>& fn) {
        std::size_t did = 0;
        in_job = true;
        for (;;) {
            std::size_t i = next_.fetch_add(1);
            if (i >= count) break;
            try {
                fn(i);
            } catch (...) {
                std::lock_guard<std::mutex> lock(mu_);
                if (!error_) error_ = std::current_exception();
            }
            ++did;
        }
        in_job = false;
        return did;
    }

    void loop() {
        std::uint64_t seen = 0;
        for (;;) {
            std::unique_lock<std::mutex> lock(mu_);
            cv_.wait(lock, [&] { return stop_ || (generation_ != seen && fn_ != nullptr); });
            if (stop_) return;
            seen = generation_;
            const std::function<void(std::size_t)>& fn = *fn_;
            const std::size_t count = count_;
            ++inside_;  // joined under the lock: the caller cannot end this job until we leave it
            lock.unlock();
            std::size_t did = work(count, fn);
            lock.lock();
            done_ += did;
            --inside_;
            if (done_ == count_ && inside_ == 0) done_cv_.notify_all();
        }
    }

public:
    static thread_local bool in_job;

private:
    std::vector<std::thread> threads_;
    std::mutex mu_, job_mu_;
    std::condition_variable cv_, done_cv_;
    const std::function<void(std::size_t)>* fn_ = nullptr;
    std::size_t count_ = 0, done_ = 0, inside_ = 0;
    std::atomic<std::size_t> next_{0};
    std::uint64_t generation_ = 0;
    bool stop_ = false;
    std::exception_ptr error_;
};

thread_local bool Pool::in_job = false;

Pool& pool() {
    static Pool p;
    return p;
}

std::atomic<int> g_threads{1};

}  // namespace

void set_threads(int count) {
    if (count < 1) count = 1;
    if (count > 64) count = 64;
    pool().resize(count - 1);
    g_threads = count;
}

int threads() { return g_threads.load(); }

std::size_t pool_selftest(std::size_t jobs, std::size_t max_count) {
    // Back-to-back jobs of changing sizes (the pattern that exposed the overrun): every index of every job must
    // run exactly once. Returns the number of indices that ran a wrong number of times (0 when sound).
    std::size_t bad = 0;
    std::vector<std::atomic<int>> hits(max_count);
    for (std::size_t j = 0; j < jobs; ++j) {
        const std::size_t count = 1 + (j * 7919 + (j >> 3) * 104729) % max_count;
        for (auto& h : hits) h.store(0);
        parallel_for(count, [&](std::size_t i) { hits[i].fetch_add(1); });
        for (std::size_t i = 0; i < max_count; ++i) bad += std::size_t(hits[i].load() != (i < count ? 1 : 0));
    }
    return bad;
}

void parallel_for(std::size_t count, const std::function<void(std::size_t)>& fn) {
    if (count == 0) return;
    if (count == 1 || g_threads.load() <= 1 || Pool::in_job) {
        for (std::size_t i = 0; i < count; ++i) fn(i);
        return;
    }
    pool().run(count, fn);
}

}  // namespace medhe
