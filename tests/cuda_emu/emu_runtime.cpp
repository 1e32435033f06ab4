// The scheduler behind emu_cuda.h (NOTE: [CUDA emulation] there) and the few CUDA runtime
// calls kernels.cu makes, answered from the emulated device configuration.
#include "emu_cuda.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define PRSGD_EMU_ASAN 1
#else
#define PRSGD_EMU_ASAN 0
#endif

#include "emu_api.h"

// Bounds of the __shared__ variables (all in this section), provided by the linker.
extern "C" char __start_prsgd_emu_shared[] __attribute__((weak));
extern "C" char __stop_prsgd_emu_shared[] __attribute__((weak));

namespace prsgd_emu {

uint3 g_block_idx;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

struct Config {
  int device = 0;
  int sms = 132;
  int blocks_per_sm = 8;
  int block_order = PRSGD_EMU_FORWARD;
  int thread_order = PRSGD_EMU_FORWARD;
  uint64_t seed = 0;
};
Config g_config;
std::mt19937_64 g_rng;
cudaError_t g_last_error = cudaSuccess;
std::vector<int64_t> g_grids;  // grid of every launch since the last reset

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 idx;
  bool done = false;
  const Barrier* waiting_on = nullptr;  // null: runnable
  uint64_t wait_for = 0;                // generation that releases it
  void* fake_stack = nullptr;           // ASan's, while switched out
};

#if PRSGD_EMU_ASAN
constexpr size_t kStackBytes = 1 << 20;
#else
constexpr size_t kStackBytes = 256 << 10;
#endif

std::vector<Fiber> g_fibers;
std::vector<char*> g_stacks;
Fiber* g_current = nullptr;
ucontext_t g_scheduler;
[[maybe_unused]] const void* g_scheduler_stack = nullptr;  // for ASan's fiber switch annotations
[[maybe_unused]] size_t g_scheduler_stack_size = 0;
[[maybe_unused]] void* g_scheduler_fake_stack = nullptr;
const std::function<void()>* g_body = nullptr;
Barrier g_block_barrier;
std::vector<Barrier> g_warp_barriers;
std::vector<uint64_t> g_shuffle_slots;
int g_live = 0;

// Leaves the current fiber for the scheduler. `exiting`: the fiber never comes back.
void to_scheduler(bool exiting) {
  Fiber* f = g_current;
#if PRSGD_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, g_scheduler_stack,
                                 g_scheduler_stack_size);
#else
  (void)exiting;
#endif
  swapcontext(&f->ctx, &g_scheduler);
#if PRSGD_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
}

void fiber_main() {
#if PRSGD_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
  (*g_body)();
  g_current->done = true;
  to_scheduler(/*exiting=*/true);
  fail("a finished fiber was resumed");
}

void wait_at(Barrier& b, int needed) {
  const uint64_t release = b.generation + 1;
  if (++b.arrived == needed) {
    b.arrived = 0;
    b.generation = release;
  }
  g_current->waiting_on = &b;
  g_current->wait_for = release;
  to_scheduler(false);
}

bool runnable(const Fiber& f) {
  return !f.done && (f.waiting_on == nullptr || f.waiting_on->generation >= f.wait_for);
}

// Picks the next thread to run, following the configured thread order; -1 if none can run.
int pick() {
  const int n = static_cast<int>(g_fibers.size());
  if (g_config.thread_order == PRSGD_EMU_SHUFFLED) {
    int candidates = 0, chosen = -1;
    for (int i = 0; i < n; ++i) {  // reservoir sampling: uniform among the runnable ones
      if (runnable(g_fibers[i]) && std::uniform_int_distribution<int>(0, candidates++)(g_rng) == 0) {
        chosen = i;
      }
    }
    return chosen;
  }
  for (int k = 0; k < n; ++k) {
    const int i = g_config.thread_order == PRSGD_EMU_REVERSE ? n - 1 - k : k;
    if (runnable(g_fibers[i])) return i;
  }
  return -1;
}

__attribute__((no_sanitize_address)) void poison_shared() {
  if (__start_prsgd_emu_shared == nullptr) return;
  for (volatile char* p = __start_prsgd_emu_shared; p < __stop_prsgd_emu_shared; ++p) *p = '\xff';
}

void run_block(unsigned threads) {
  poison_shared();
  g_fibers.assign(threads, Fiber{});
  while (g_stacks.size() < threads) {
    g_stacks.push_back(static_cast<char*>(std::aligned_alloc(64, kStackBytes)));
  }
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = g_fibers[t];
    f.stack = g_stacks[t];
    f.idx = make_uint3(t, 0, 0);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  g_block_barrier = Barrier{};
  g_warp_barriers.assign((threads + 31) / 32, Barrier{});
  g_shuffle_slots.assign(g_warp_barriers.size() * 32, 0);
  g_live = static_cast<int>(threads);
  while (g_live > 0) {
    const int i = pick();
    if (i < 0) fail("deadlock: threads wait at a barrier that cannot complete");
    Fiber& f = g_fibers[i];
    f.waiting_on = nullptr;
    g_current = &f;
#if PRSGD_EMU_ASAN
    __sanitizer_start_switch_fiber(&g_scheduler_fake_stack, f.stack, kStackBytes);
#endif
    swapcontext(&g_scheduler, &f.ctx);
#if PRSGD_EMU_ASAN
    __sanitizer_finish_switch_fiber(g_scheduler_fake_stack, nullptr, nullptr);
#endif
    g_current = nullptr;
    if (f.done) {
      --g_live;
      // Exited threads count as arrived at __syncthreads, as on the GPU.
      if (g_block_barrier.arrived > 0 && g_block_barrier.arrived == g_live) {
        g_block_barrier.arrived = 0;
        ++g_block_barrier.generation;
      }
    }
  }
}

}  // namespace

void fail(const char* what) {
  std::fprintf(stderr, "prsgd cuda emulation: %s (block %u, thread %d)\n", what, g_block_idx.x,
               g_current ? static_cast<int>(g_current->idx.x) : -1);
  std::fflush(stderr);
  std::abort();
}

const uint3& thread_idx() {
  if (g_current == nullptr) fail("threadIdx read outside a kernel");
  return g_current->idx;
}

void sync_block() { wait_at(g_block_barrier, g_live); }

uint64_t shuffle_down(uint64_t bits, unsigned delta) {
  const unsigned t = thread_idx().x, lane = t % 32, warp = t / 32;
  if ((warp + 1) * 32 > g_fibers.size()) fail("shuffle in a partial warp");
  uint64_t* slots = &g_shuffle_slots[warp * 32];
  slots[lane] = bits;
  wait_at(g_warp_barriers[warp], 32);  // every lane has published
  const uint64_t result = lane + delta < 32 ? slots[lane + delta] : bits;
  wait_at(g_warp_barriers[warp], 32);  // every lane has read before a slot is reused
  return result;
}

uint32_t ballot(bool pred) {
  const unsigned t = thread_idx().x, lane = t % 32, warp = t / 32;
  if ((warp + 1) * 32 > g_fibers.size()) fail("ballot in a partial warp");
  uint64_t* slots = &g_shuffle_slots[warp * 32];
  slots[lane] = pred ? 1 : 0;
  wait_at(g_warp_barriers[warp], 32);  // every lane has voted
  uint32_t result = 0;
  for (unsigned l = 0; l < 32; ++l) result |= uint32_t(slots[l] != 0) << l;
  wait_at(g_warp_barriers[warp], 32);  // every lane has read before a slot is reused
  return result;
}

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const unsigned threads = block.x * block.y * block.z;
  if (blocks == 0 || threads == 0 || threads > 1024 || grid.y != 1 || grid.z != 1 ||
      block.y != 1 || block.z != 1) {
    // The kernels are 1-D; anything else is a configuration error here.
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (g_current != nullptr) fail("kernel launched from a kernel");
  g_grids.push_back(static_cast<int64_t>(grid.x));
  std::vector<unsigned> order(grid.x);
  std::iota(order.begin(), order.end(), 0u);
  if (g_config.block_order == PRSGD_EMU_REVERSE) std::reverse(order.begin(), order.end());
  if (g_config.block_order == PRSGD_EMU_SHUFFLED) std::shuffle(order.begin(), order.end(), g_rng);
  g_grid_dim = grid;
  g_block_dim = block;
  g_body = &body;
  for (unsigned b : order) {
    g_block_idx = make_uint3(b, 0, 0);
    run_block(threads);
  }
  g_body = nullptr;
}

}  // namespace prsgd_emu

// ---- the CUDA runtime calls of kernels.cu ------------------------------------------------------

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = prsgd_emu::g_last_error;
  prsgd_emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* device) {
  *device = prsgd_emu::g_config.device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = prsgd_emu::g_config.sms;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* /*func*/,
                                                          int /*block_size*/,
                                                          size_t /*dynamic_smem*/) {
  *num_blocks = prsgd_emu::g_config.blocks_per_sm;
  return cudaSuccess;
}

void prsgd_emu_configure(int device, int sms, int blocks_per_sm, int block_order,
                         int thread_order, uint64_t seed) {
  prsgd_emu::g_config = {device, sms, blocks_per_sm, block_order, thread_order, seed};
  prsgd_emu::g_rng.seed(seed);
  prsgd_emu::g_grids.clear();
  prsgd_emu::g_last_error = cudaSuccess;
}

int64_t prsgd_emu_launches(int64_t* grids, int64_t capacity) {
  const int64_t n = static_cast<int64_t>(prsgd_emu::g_grids.size());
  for (int64_t i = 0; i < n && i < capacity; ++i) grids[i] = prsgd_emu::g_grids[i];
  prsgd_emu::g_grids.clear();
  return n;
}

}  // extern "C"
