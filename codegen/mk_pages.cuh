// mpkir megakernel: the paged KV cache's pages, allocated and freed by the serving kernel itself.
// One thread of worker 0 runs it between taking a step's inputs and releasing the step to all workers:
//   1. every released request slot gives its pages back (pushed on the free stack, last page first);
//   2. every live token row t (seq s = seq_ids[t] >= 0, position p) gets pages until its request holds
//      p / page_size + 1 of them (popped from the stack into page_table[s][count[s]++]).
// The host admits a request only while the pool has the pages for its whole life (it counts, the kernel picks
// which), so an empty stack is a bug surfaced as error code 4, never a page shared by two requests.
// State (device, int32): kp[0] stack top, kp[1 .. 1+R) pages held per slot, kp[1+R .. 1+R+P) the stack
// (a fresh pool: top P, nothing held, stack P-1 .. 0, so pages come out as 0, 1, 2, ...).
// Plain sequential C++ (tests compile this text on the CPU: mpkir/testing/cta.py).
#pragma once

#define MK_PAGES_EMPTY 4  // status[0] when a step needs a page and the stack is empty

__device__ __noinline__ bool mk_pages_step(int* kp, int R, int P, int* table, int pps, int page_size,
                                           const int* released, int nrel, const int* seq_ids,
                                           const int* positions, int T) {
  int* held = kp + 1;
  int* stack = kp + 1 + R;
  int top = kp[0];
  for (int r = 0; r < nrel; ++r) {
    const int s = released[r];
    if (s < 0 || s >= R) continue;
    for (int j = held[s] - 1; j >= 0; --j) stack[top++] = table[s * pps + j];
    held[s] = 0;
  }
  bool ok = true;
  for (int t = 0; t < T && ok; ++t) {
    const int s = seq_ids[t];
    if (s < 0 || s >= R) continue;
    const int need = min(positions[t] / page_size + 1, pps);
    while (held[s] < need) {
      if (top == 0) { ok = false; break; }
      table[s * pps + held[s]++] = stack[--top];
    }
  }
  kp[0] = top;
  return ok;
}
