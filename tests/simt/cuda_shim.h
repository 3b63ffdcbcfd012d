// Just enough of CUDA C++ to compile diagnet's kernels as host C++ and run them on the CPU.
//
// The emulation model (SIMT without the W): the launcher in harness.cpp runs the blocks of a
// grid one after another, and all threads of one block at the same time, one std::thread per
// CUDA thread. That gives the two properties the kernels rely on:
//
//  * __shared__ is `static`. A function-local static is one object shared by every std::thread,
//    so all threads of the running block see the same shared array; since blocks never run
//    concurrently, no two blocks share it at the same time. (Like real shared memory it is not
//    cleared between blocks; a kernel must write before it reads.)
//  * __syncthreads() is a real barrier across the block's std::threads. A thread whose kernel
//    returns drops out of the barrier (as an exited CUDA thread does), and the harness checks
//    that all threads of a block passed the same number of barriers, so a __syncthreads under
//    divergent control flow is reported instead of passing by luck or hanging.
//
// threadIdx and blockIdx are thread_local; blockDim and gridDim are the same for every thread
// of a launch and are plain globals. Warp intrinsics, atomics and dynamic shared memory are
// not emulated: the kernels do not use them, and a use would fail to compile here.
#pragma once

#include <atomic>
#include <cmath>
#include <cstddef>
#include <mutex>

// The CUDA math functions the kernels call, as the host C++ overloads (float and double).
using std::erfc;
using std::exp;
using std::log;
using std::sqrt;

// The round-to-nearest arithmetic intrinsics (never contracted into a fused multiply-add on
// the GPU): plain operations here, since host C++ in ISO mode (-std=c++20) does not contract
// either (-ffp-contract=off) and std::sqrt is correctly rounded.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
// g++ already understands __restrict__ as an extension keyword.

namespace simt {

// A reusable barrier for a team of threads whose size shrinks as threads exit (the semantics
// of std::barrier::arrive_and_drop). Arrivals are counted under a mutex; waiters sleep on an
// atomic generation number (futex based std::atomic::wait), so a release wakes every waiter
// without making them queue for a mutex again. Both are synchronisation ThreadSanitizer
// understands: writes before the barrier happen-before reads after it.
class Barrier {
public:
    explicit Barrier(std::size_t count) : expected_(count) {}

    void arrive_and_wait() {
        unsigned generation;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            generation = generation_.load(std::memory_order_relaxed);
            if (++arrived_ == expected_) {
                release(generation);
                return;
            }
        }
        wait(generation);
    }

    // As arrive_and_wait, but the last thread to arrive runs `completion` before the others
    // are released.
    template <typename F>
    void arrive_and_wait(F&& completion) {
        unsigned generation;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            generation = generation_.load(std::memory_order_relaxed);
            if (++arrived_ == expected_) {
                completion();
                release(generation);
                return;
            }
        }
        wait(generation);
    }

    void arrive_and_drop() {
        std::lock_guard<std::mutex> lock(mutex_);
        --expected_;
        if (expected_ > 0 && arrived_ == expected_) release(generation_.load(std::memory_order_relaxed));
    }

    // Only while no thread is inside the barrier.
    void reset(std::size_t count) {
        std::lock_guard<std::mutex> lock(mutex_);
        expected_ = count;
        arrived_ = 0;
    }

private:
    void release(unsigned generation) {  // with mutex_ held
        arrived_ = 0;
        generation_.store(generation + 1, std::memory_order_release);
        generation_.notify_all();
    }

    void wait(unsigned generation) {
        while (generation_.load(std::memory_order_acquire) == generation) {
            generation_.wait(generation, std::memory_order_acquire);
        }
    }

    std::mutex mutex_;
    std::size_t expected_;
    std::size_t arrived_ = 0;
    std::atomic<unsigned> generation_{0};
};

inline Barrier* block_barrier = nullptr;     // the running block's barrier
inline thread_local unsigned long long sync_count = 0;  // barriers this thread passed

}  // namespace simt

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

inline void __syncthreads() {
#ifndef SIMT_BROKEN_SYNCTHREADS
    ++simt::sync_count;
    simt::block_barrier->arrive_and_wait();
#endif
    // With SIMT_BROKEN_SYNCTHREADS the barrier does nothing: the harness self-test builds
    // that way to check that ThreadSanitizer then reports the shared-memory races.
}
