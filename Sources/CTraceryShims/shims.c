#define _GNU_SOURCE
#include "CTraceryShims.h"

#include <link.h>
#include <linux/membarrier.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

int ctracery_membarrier(int cmd, unsigned int flags) {
  return (int)syscall(SYS_membarrier, cmd, flags, 0);
}

unsigned long ctracery_getauxval(unsigned long type) { return getauxval(type); }

int ctracery_memfd_create(const char *name) { return (int)syscall(SYS_memfd_create, name, MFD_CLOEXEC); }

int ctracery_gettid(void) { return (int)syscall(SYS_gettid); }

struct collect_state {
  struct ctracery_object *out;
  size_t capacity;
  size_t count;
};

static int collect_object(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  struct collect_state *state = data;
  if (state->count < state->capacity) {
    state->out[state->count].name = info->dlpi_name ? info->dlpi_name : "";
    state->out[state->count].bias = (uint64_t)info->dlpi_addr;
  }
  state->count += 1;
  return 0;
}

size_t ctracery_loaded_objects(struct ctracery_object *out, size_t capacity) {
  struct collect_state state = {out, capacity, 0};
  dl_iterate_phdr(collect_object, &state);
  return state.count;
}

// ---- SIGTRAP ---------------------------------------------------------------------------------

static _Atomic(const struct ctracery_poke_table *) published_table;
static _Atomic uint64_t table_generation;
static atomic_long handlers_in_flight;
static _Atomic uint64_t traps_handled;
static struct sigaction previous_action;
static atomic_int installed;

// The first byte of every instruction the patcher writes: a trap at a site whose byte is now one
// of these was ours, and the patch completed before the handler ran.
static int is_patcher_opcode(uint8_t byte) {
  return byte == 0x0f /* nopl */ || byte == 0xe8 /* call */ || byte == 0xe9 /* jmp */ || byte == 0x90;
}

static const struct ctracery_poke *find_poke(const struct ctracery_poke_table *table, uint64_t site) {
  size_t low = 0, high = table->count;
  while (low < high) {
    size_t mid = low + (high - low) / 2;
    uint64_t at = table->pokes[mid].site;
    if (at == site) return &table->pokes[mid];
    if (at < site) low = mid + 1; else high = mid;
  }
  return NULL;
}

static void chain_to_previous(int sig, siginfo_t *info, void *context) {
  if (previous_action.sa_flags & SA_SIGINFO) {
    if (previous_action.sa_sigaction) previous_action.sa_sigaction(sig, info, context);
    return;
  }
  if (previous_action.sa_handler == SIG_IGN) return;
  if (previous_action.sa_handler == SIG_DFL) {
    // The default action for SIGTRAP terminates with a core dump: do exactly that.
    signal(SIGTRAP, SIG_DFL);
    raise(SIGTRAP);
    return;
  }
  previous_action.sa_handler(sig);
}

static void trap_handler(int sig, siginfo_t *info, void *context) {
  ucontext_t *uc = context;
  greg_t *gregs = uc->uc_mcontext.gregs;
  if (info->si_code == SI_KERNEL) {
    // T1: announce ourselves before looking at any table (pairs with the patcher's check of
    // in_flight before it frees retired tables).
    atomic_fetch_add_explicit(&handlers_in_flight, 1, memory_order_seq_cst);
    uint64_t site = (uint64_t)gregs[REG_RIP] - 1;
    int handled = 0;
    for (;;) {
      // T2: generation, table, byte, in this order. The patcher stores a table and then bumps
      // the generation before it writes any 0xCC, so a 0xCC we read that the table we loaded does
      // not explain means a batch began or ended meanwhile: the generation moved, try again.
      uint64_t generation = atomic_load_explicit(&table_generation, memory_order_seq_cst);
      const struct ctracery_poke_table *table = atomic_load_explicit(&published_table, memory_order_seq_cst);
      uint8_t byte = __atomic_load_n((const uint8_t *)site, __ATOMIC_SEQ_CST);
      if (byte != 0xCC) {
        // The batch finished between the trap and now: run whatever is there now.
        if (is_patcher_opcode(byte)) {
          gregs[REG_RIP] = (greg_t)site;
          handled = 1;
        }
        break;
      }
      const struct ctracery_poke *poke = table ? find_poke(table, site) : NULL;
      if (poke) {
        // T3: emulate the instruction being installed.
        switch (poke->kind) {
        case CTRACERY_POKE_CALL:
          gregs[REG_RSP] -= 8;
          *(uint64_t *)gregs[REG_RSP] = site + 5;
          gregs[REG_RIP] = (greg_t)poke->target;
          break;
        case CTRACERY_POKE_JMP:
          gregs[REG_RIP] = (greg_t)poke->target;
          break;
        default:
          gregs[REG_RIP] = (greg_t)(site + 5);
          break;
        }
        handled = 1;
        break;
      }
      // A stable 0xCC that no batch placed: not ours.
      if (atomic_load_explicit(&table_generation, memory_order_seq_cst) == generation) break;
    }
    atomic_fetch_sub_explicit(&handlers_in_flight, 1, memory_order_seq_cst);
    if (handled) {
      atomic_fetch_add_explicit(&traps_handled, 1, memory_order_relaxed);
      return;
    }
  }
  chain_to_previous(sig, info, context);
}

int ctracery_install_trap_handler(void) {
  int expected = 0;
  if (!atomic_compare_exchange_strong(&installed, &expected, 1)) return 0;
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = trap_handler;
  action.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  if (sigaction(SIGTRAP, &action, &previous_action) != 0) {
    atomic_store(&installed, 0);
    return -1;
  }
  return 0;
}

void ctracery_publish_pokes(const struct ctracery_poke_table *table) {
  atomic_store_explicit(&published_table, table, memory_order_seq_cst);
  atomic_fetch_add_explicit(&table_generation, 1, memory_order_seq_cst);
}

long ctracery_trap_handlers_in_flight(void) {
  return atomic_load_explicit(&handlers_in_flight, memory_order_seq_cst);
}

uint64_t ctracery_traps_handled(void) { return atomic_load_explicit(&traps_handled, memory_order_relaxed); }
