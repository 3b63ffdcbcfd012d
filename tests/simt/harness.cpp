// SIMT emulation driver: runs one launch of a kernel from a kernels/*.cu file on the CPU.
//
//   harness PROBLEM_FILE RESULT_FILE
//
// The build names the kernel source and its table of entry points (tests/simt/harness.py):
//   -DSIMT_SOURCE='"layer_norm.cu"' -DSIMT_TABLE='"layer_norm.kernels.h"'
// The source is #included as is (build with -I kernels -I tests/simt); tuning constants come in
// as the same -D options the Python launcher gives NVRTC. The table lists the entry points, one
// SIMT_KERNEL(name) each; their signatures are derived from the C declarations (`Param`).
//
// PROBLEM_FILE (little endian), written by tests/simt/harness.py (run_harness):
//   "DIAGSIM1"  u32 name_length  name  u32 grid[3]  u32 block[3]  u32 nargs
//   per argument: u8 kind, then
//     'A' (device array): u8 dtype ('f' float32, 'd' float64, 'i' int32, 'q' int64),
//                         u64 nbytes, nbytes of data
//     'i' (int32 scalar): i32       'l' (int64 scalar): i64
//     'f' (float32 scalar): f32     'd' (float64 scalar): f64
//     'P' (table of device addresses): u64 count, count x u32 block index
//   u32 nblocks, then per block (device memory that address tables point into): u64 nbytes, data
// RESULT_FILE: per output array: u32 argument index, u64 nbytes, data; then every block, as
// u32 nargs + block index, u64 nbytes, data (a kernel may write through an address table).
//
// An argument of the wrong kind or dtype is an error, which catches a launcher that passes a
// Python int (a 64-bit long long to CuPy) where the kernel takes an int, or the wrong array
// dtype. Every array and every block lives in its own heap block of exactly its size, so an
// AddressSanitizer build reports any out-of-bounds access. An address table reaches the kernel
// with each entry the host address of its block.
//
// Exit status: 0 ok, 2 usage/IO error, 3 bad launch (unknown kernel, signature mismatch,
// invalid grid or block), 4 divergent __syncthreads.

#include "cuda_shim.h"

#include SIMT_SOURCE

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

// _Exit, not exit: fail may run on a worker thread while the rest of the team is blocked.
[[noreturn]] void fail(int status, const std::string& message) {
    std::fprintf(stderr, "simt harness: %s\n", message.c_str());
    std::fflush(stderr);
    std::_Exit(status);
}

struct Arg {
    char kind = 0;    // 'A', 'i', 'l', 'f', 'd', 'P'
    char dtype = 0;   // for arrays
    std::vector<unsigned char> bytes;
    std::int32_t i32 = 0;
    std::int64_t i64 = 0;
    float f32 = 0;
    double f64 = 0;
    std::vector<unsigned long long> table;  // 'P': block indices, then their addresses
};

// How one C parameter type travels: its signature letter, the argument kind and array dtype
// it needs, and how to get it from an Arg. Letters (as in diagnet/cuda_launch.py): F / O float
// array (input / output), I int32 array (input), L int64 array (input), U table of device
// addresses (input), i int32, l int64, f float scalar.
template <typename P> struct Param;
template <typename T, char LETTER, char DTYPE>
struct ArrayParam {
    static constexpr char letter = LETTER, kind = 'A', dtype = DTYPE;
    static T get(Arg& a) { return reinterpret_cast<T>(a.bytes.data()); }
};
template <> struct Param<const float*> : ArrayParam<const float*, 'F', 'f'> {};
template <> struct Param<float*> : ArrayParam<float*, 'O', 'f'> {};
template <> struct Param<const double*> : ArrayParam<const double*, 'F', 'd'> {};
template <> struct Param<double*> : ArrayParam<double*, 'O', 'd'> {};
template <> struct Param<const int*> : ArrayParam<const int*, 'I', 'i'> {};
template <> struct Param<const long long*> : ArrayParam<const long long*, 'L', 'q'> {};
template <> struct Param<const unsigned long long*> {
    static constexpr char letter = 'U', kind = 'P', dtype = 0;
    static const unsigned long long* get(Arg& a) { return a.table.data(); }
};
template <> struct Param<int> {
    static constexpr char letter = 'i', kind = 'i', dtype = 0;
    static int get(Arg& a) { return a.i32; }
};
template <> struct Param<long long> {
    static constexpr char letter = 'l', kind = 'l', dtype = 0;
    static long long get(Arg& a) { return a.i64; }
};
template <> struct Param<float> {
    static constexpr char letter = 'f', kind = 'f', dtype = 0;
    static float get(Arg& a) { return a.f32; }
};
template <> struct Param<double> {
    static constexpr char letter = 'f', kind = 'd', dtype = 0;
    static double get(Arg& a) { return a.f64; }
};

struct Kernel {
    const char* name;
    std::string signature;  // one letter per parameter
    std::string kinds;      // the argument kind each parameter needs
    std::string dtypes;     // the array dtype each parameter needs ('-' for scalars)
    std::function<void(std::vector<Arg>&)> call;
};

template <typename... P, std::size_t... I>
void invoke(void (*fn)(P...), std::vector<Arg>& args, std::index_sequence<I...>) {
    fn(Param<P>::get(args[I])...);
}

template <typename... P>
Kernel make_kernel(const char* name, void (*fn)(P...)) {
    return Kernel{name, std::string{Param<P>::letter...}, std::string{Param<P>::kind...},
                  std::string{(Param<P>::dtype ? Param<P>::dtype : '-')...},
                  [fn](std::vector<Arg>& args) { invoke(fn, args, std::index_sequence_for<P...>{}); }};
}

#define SIMT_KERNEL(NAME) make_kernel(#NAME, NAME),

const std::vector<Kernel> kKernels = {
#include SIMT_TABLE
};

class Reader {
public:
    explicit Reader(const char* path) : file_(std::fopen(path, "rb")) {
        if (!file_) fail(2, std::string("cannot open ") + path);
    }
    ~Reader() { std::fclose(file_); }
    void read(void* dst, std::size_t n) {
        if (n && std::fread(dst, 1, n, file_) != n) fail(2, "truncated problem file");
    }
    template <typename T>
    T get() {
        T v;
        read(&v, sizeof v);
        return v;
    }

private:
    std::FILE* file_;
};

std::size_t dtype_size(char dtype) {
    switch (dtype) {
        case 'f': case 'i': return 4;
        case 'd': case 'q': return 8;
        default: fail(3, std::string("unknown array dtype '") + dtype + "'");
    }
}

void check_signature(const Kernel& k, const std::vector<Arg>& args) {
    const std::size_t n = k.signature.size();
    if (args.size() != n) {
        fail(3, std::string(k.name) + " takes " + std::to_string(n) + " arguments; got " +
                    std::to_string(args.size()));
    }
    for (std::size_t i = 0; i < n; ++i) {
        const Arg& a = args[i];
        const bool ok = a.kind == k.kinds[i] && (a.kind != 'A' || a.dtype == k.dtypes[i]);
        if (!ok) {
            fail(3, std::string(k.name) + ": argument " + std::to_string(i) + " should be '" +
                        k.signature[i] + "' (signature " + k.signature + ", kind '" + k.kinds[i] +
                        "' dtype '" + k.dtypes[i] + "'), got kind '" + a.kind + "' dtype '" +
                        (a.dtype ? a.dtype : '-') + "'");
        }
    }
}

// Runs the blocks of the grid one after another, each on a team of std::threads, one per CUDA
// thread, all running at once. The team is created once per launch and reused for every block:
// after a block, each thread waits at a team barrier whose last arrival checks the block's
// barrier counts and resets __syncthreads' barrier for the next block.
void launch(const Kernel& k, dim3 grid, dim3 block, std::vector<Arg>& args) {
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u || grid.y > 65535 ||
        grid.z > 65535) {
        fail(3, "invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                    ", " + std::to_string(grid.z) + ")");
    }
    const unsigned threads = block.x * block.y * block.z;
    if (block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 ||
        block.z > 64 || 1ull * block.x * block.y * block.z > 1024) {
        fail(3, "invalid block (" + std::to_string(block.x) + ", " + std::to_string(block.y) +
                    ", " + std::to_string(block.z) + ")");
    }
    const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
    if (blocks * threads > (1ull << 24)) fail(3, "launch too large to emulate");

    gridDim = grid;
    blockDim = block;
    std::vector<unsigned long long> syncs(threads);
    simt::Barrier sync_barrier(threads);  // __syncthreads within a block
    simt::Barrier team_barrier(threads);  // between blocks
    simt::block_barrier = &sync_barrier;
    unsigned long long current = 0;       // block being checked, for the error message

    auto check_block = [&] {
        for (unsigned tid = 1; tid < threads; ++tid) {
            if (syncs[tid] != syncs[0]) {
                const unsigned long long b = current;
                fail(4, std::string(k.name) + ": divergent __syncthreads in block (" +
                            std::to_string(b % grid.x) + ", " +
                            std::to_string(b / grid.x % grid.y) + ", " +
                            std::to_string(b / grid.x / grid.y) + "): thread 0 passed " +
                            std::to_string(syncs[0]) + " barriers, thread " +
                            std::to_string(tid) + " passed " + std::to_string(syncs[tid]));
            }
        }
        ++current;
        sync_barrier.reset(threads);
    };

    std::vector<std::thread> team;
    team.reserve(threads);
    for (unsigned tid = 0; tid < threads; ++tid) {
        team.emplace_back([&, tid] {
            threadIdx = uint3{tid % block.x, tid / block.x % block.y, tid / block.x / block.y};
            for (unsigned long long b = 0; b < blocks; ++b) {
                blockIdx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y),
                                 unsigned(b / grid.x / grid.y)};
                simt::sync_count = 0;
                k.call(args);
                syncs[tid] = simt::sync_count;
                sync_barrier.arrive_and_drop();
                team_barrier.arrive_and_wait(check_block);
            }
        });
    }
    for (std::thread& t : team) t.join();
    simt::block_barrier = nullptr;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) fail(2, "usage: harness PROBLEM_FILE RESULT_FILE");
    Reader in(argv[1]);
    char magic[8];
    in.read(magic, sizeof magic);
    if (std::memcmp(magic, "DIAGSIM1", 8) != 0) fail(2, "not a DIAGSIM1 problem file");
    std::string name(in.get<std::uint32_t>(), '\0');
    in.read(name.data(), name.size());
    dim3 grid, block;
    grid.x = in.get<std::uint32_t>();
    grid.y = in.get<std::uint32_t>();
    grid.z = in.get<std::uint32_t>();
    block.x = in.get<std::uint32_t>();
    block.y = in.get<std::uint32_t>();
    block.z = in.get<std::uint32_t>();

    std::vector<Arg> args(in.get<std::uint32_t>());
    for (Arg& a : args) {
        a.kind = in.get<char>();
        if (a.kind == 'A') {
            a.dtype = in.get<char>();
            const auto nbytes = in.get<std::uint64_t>();
            if (nbytes % dtype_size(a.dtype) != 0) fail(2, "array size is not a whole number of elements");
            a.bytes.resize(nbytes);  // exactly nbytes, so ASan flags any overrun
            in.read(a.bytes.data(), nbytes);
        } else if (a.kind == 'i') {
            a.i32 = in.get<std::int32_t>();
        } else if (a.kind == 'l') {
            a.i64 = in.get<std::int64_t>();
        } else if (a.kind == 'f') {
            a.f32 = in.get<float>();
        } else if (a.kind == 'd') {
            a.f64 = in.get<double>();
        } else if (a.kind == 'P') {
            a.table.resize(in.get<std::uint64_t>());
            for (unsigned long long& entry : a.table) entry = in.get<std::uint32_t>();
        } else {
            fail(2, std::string("unknown argument kind '") + a.kind + "'");
        }
    }
    std::vector<std::vector<unsigned char>> blocks(in.get<std::uint32_t>());
    for (std::vector<unsigned char>& b : blocks) {
        b.resize(in.get<std::uint64_t>());  // exactly its size, as the arrays
        in.read(b.data(), b.size());
    }
    for (Arg& a : args) {  // address tables: block indices become the blocks' addresses
        for (unsigned long long& entry : a.table) {
            if (entry >= blocks.size()) fail(2, "address table entry names no block");
            entry = reinterpret_cast<std::uintptr_t>(blocks[entry].data());
        }
    }

    const Kernel* kernel = nullptr;
    for (const Kernel& k : kKernels)
        if (name == k.name) kernel = &k;
    if (!kernel) fail(3, "no kernel named " + name + " in this build");
    check_signature(*kernel, args);

    launch(*kernel, grid, block, args);

    std::FILE* out = std::fopen(argv[2], "wb");
    if (!out) fail(2, std::string("cannot write ") + argv[2]);
    for (std::uint32_t i = 0; i < args.size(); ++i) {
        if (kernel->signature[i] != 'O') continue;
        const std::uint64_t nbytes = args[i].bytes.size();
        std::fwrite(&i, sizeof i, 1, out);
        std::fwrite(&nbytes, sizeof nbytes, 1, out);
        std::fwrite(args[i].bytes.data(), 1, nbytes, out);
    }
    for (std::uint32_t j = 0; j < blocks.size(); ++j) {
        const std::uint32_t index = static_cast<std::uint32_t>(args.size()) + j;
        const std::uint64_t nbytes = blocks[j].size();
        std::fwrite(&index, sizeof index, 1, out);
        std::fwrite(&nbytes, sizeof nbytes, 1, out);
        std::fwrite(blocks[j].data(), 1, nbytes, out);
    }
    if (std::fclose(out) != 0) fail(2, "write error");
    return 0;
}
