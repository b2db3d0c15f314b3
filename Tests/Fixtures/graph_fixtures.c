#include "graph_fixtures.h"

#include <setjmp.h>

#define TRACED __attribute__((patchable_function_entry(5, 0), noinline, noclone))

static jmp_buf escape;
static int escape_armed;

TRACED long tracery_graph_inner(long n) {
  if (escape_armed) {
    escape_armed = 0;
    longjmp(escape, 1);
  }
  __asm__ volatile("");
  return n + 3;
}
TRACED long tracery_graph_middle(long n) { return tracery_graph_inner(n) * 2; }
TRACED long tracery_graph_outer(long n) { return tracery_graph_middle(n) + 1; }
TRACED long tracery_graph_leaf(long n) { return n * 10; }

TRACED long tracery_graph_recurse(long depth) {
  if (depth <= 1) return 1;
  long below = tracery_graph_recurse(depth - 1);
  __asm__ volatile("" : : : "memory");
  return below + 1;
}

TRACED long tracery_graph_longjmp(long unused) {
  (void)unused;
  if (setjmp(escape) == 0) {
    escape_armed = 1;
    tracery_graph_outer(100);
    return -1;  // not reached
  }
  return tracery_graph_outer(1);
}

static struct tracery_graph_event events[256];
static int event_count;

void tracery_graph_events_reset(void) { event_count = 0; }
int tracery_graph_events_count(void) { return event_count; }
struct tracery_graph_event tracery_graph_event_at(int index) { return events[index]; }

static void record(int kind, tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  if (event_count >= 256) return;
  struct tracery_graph_event *event = &events[event_count++];
  event->kind = kind;
  event->cookie = cookie;
  event->site = frame->site;
  event->depth = frame->depth;
  event->data = data[0];
  event->return_value = kind == 2 ? call->return_value[0] : call->arguments[0];
}

int tracery_graph_entry_record(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  data[0] = cookie * 1000 + frame->depth;
  record(1, frame, data, call, cookie);
  return 1;
}

void tracery_graph_exit_record(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  record(2, frame, data, call, cookie);
}

int tracery_graph_entry_decline(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  record(1, frame, data, call, cookie);
  return 0;
}
