// The C side of Tracery's handler ABI: what a handler written in C (or Swift, through this
// module) receives for each call of a traced function. Include this header from C handlers.
#ifndef TRACERY_H
#define TRACERY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// One call of a traced function, as its trampoline saved it. Handlers get a pointer to it on
/// the trampoline's stack: valid only during the handler call.
///
///   offset  field
///        0  function           entry address of the traced function
///        8  return_address     where the function will return
///       16  stack_arguments    the caller's stack arguments (7th integer argument onwards)
///       24  reserved           Tracery's own (handlers leave it alone)
///       32  arguments[6]       rdi rsi rdx rcx r8 r9  (entry and modify-return handlers may change them)
///       80  rax                rax at entry (al = vector registers used, for a varargs call)
///       88  return_value[2]    rax rdx after the original (exit), or to return (modify-return)
///      104  (padding)
///      112  float_arguments    xmm0-xmm7 at entry, 16 bytes each
///      240  float_return[2]    xmm0 xmm1 after the original, 16 bytes each
///      272  (size)
typedef struct tracery_call {
  uint64_t function;
  uint64_t return_address;
  uint64_t *stack_arguments;
  uint64_t reserved;
  uint64_t arguments[6];
  uint64_t rax;
  uint64_t return_value[2];
  uint64_t padding;
  uint64_t float_arguments[8][2] __attribute__((aligned(16)));
  uint64_t float_return[2][2] __attribute__((aligned(16)));
} tracery_call;

_Static_assert(sizeof(tracery_call) == 272, "tracery_call layout");
_Static_assert(__builtin_offsetof(tracery_call, float_arguments) == 112, "tracery_call layout");

/// The kinds of handler, one numbering everywhere (Swift's `HandlerKind`). Entry and exit are also
/// the kinds of the events the recorder writes (below).
typedef enum tracery_handler_kind {
  TRACERY_HANDLER_ENTRY = 1,
  TRACERY_HANDLER_EXIT = 2,
  TRACERY_HANDLER_MODIFY_RETURN = 3,
} tracery_handler_kind;

/// The first word of an event the function graph's recorder writes (docs/trace-format.md): the
/// kind in bits 62-63 (TRACERY_HANDLER_ENTRY or _EXIT; TRACERY_EVENT_DATA for the values after an
/// event), the shadow-stack depth modulo 2^14 in bits 48-61, and below them the site (an entry)
/// or the time-stamp counter's low 48 bits (an exit). An entry's second word is the counter.
enum {
  TRACERY_EVENT_KIND_SHIFT = 62,
  TRACERY_EVENT_DEPTH_SHIFT = 48,
  TRACERY_EVENT_DEPTH_MASK = 0x3fff,
  TRACERY_EVENT_DATA = 3,
};

/// Runs before the traced function's body.
typedef void (*tracery_entry_handler)(tracery_call *call, uint64_t cookie);
/// Runs after the body returned (or was skipped); `call->return_value` holds the result.
typedef void (*tracery_exit_handler)(tracery_call *call, uint64_t cookie);
/// Runs before the body, after entry handlers. Return non-zero to skip the body: the function
/// then returns `call->return_value` (and `call->float_return`), which the handler sets.
typedef int (*tracery_modify_return_handler)(tracery_call *call, uint64_t cookie);

/// One frame of a thread's shadow return stack (the function graph). A graph handler gets a
/// pointer to the frame of the call it sees; valid only during the handler call.
///
/// A frame begins with the layout of a `tracery_call`, and the `call` the graph handlers get is
/// the frame itself: the entry saves the argument registers straight into it and the return
/// handler the result registers, so nothing is copied for the handlers, and an exit handler still
/// sees the arguments as they were at the entry (after entry handlers changed them). `depth` and
/// `taken` live in the call's reserved and padding words.
///
///   offset  field
///        0  site             the function's patch site (its entry, or entry + 4 after endbr64)
///        8  return_address   the real return address (the stack slot holds the graph's)
///       16  stack_arguments  just above the return-address slot: the slot is stack_arguments - 8
///       24  depth            0 for the outermost traced call of the thread
///       32  arguments[6]     rdi rsi rdx rcx r8 r9 at entry (the registers the function model needs)
///       80  rax              rax at entry (variadic functions)
///       88  return_value[2]  rax rdx at the return
///      104  taken            bit i: graph user i asked for this call's exit
///      112  float_arguments  xmm0-xmm7 at entry (when a user needs vector registers)
///      240  float_return[2]  xmm0 xmm1 at the return (likewise)
///      272  data[7]          words reserved by graph users (`GraphUser` says which are whose)
///      328  resume           where the function's body returns to (in the graph's stub): a
///                            traced function it tail-calls finds this as its return address
///      336  (size)
typedef struct tracery_graph_frame {
  uint64_t site;
  uint64_t return_address;
  uint64_t stack_arguments;
  uint64_t depth;
  uint64_t arguments[6];
  uint64_t rax;
  uint64_t return_value[2];
  uint64_t taken;
  uint64_t float_arguments[8][2] __attribute__((aligned(16)));
  uint64_t float_return[2][2] __attribute__((aligned(16)));
  uint64_t data[7];
  uint64_t resume;
} tracery_graph_frame;

_Static_assert(sizeof(tracery_graph_frame) == 336, "tracery_graph_frame layout");
_Static_assert(__builtin_offsetof(tracery_graph_frame, arguments) == __builtin_offsetof(tracery_call, arguments),
               "a graph frame begins with a tracery_call");
_Static_assert(__builtin_offsetof(tracery_graph_frame, return_value) == __builtin_offsetof(tracery_call, return_value),
               "a graph frame begins with a tracery_call");
_Static_assert(__builtin_offsetof(tracery_graph_frame, float_return) == __builtin_offsetof(tracery_call, float_return),
               "a graph frame begins with a tracery_call");
_Static_assert(__builtin_offsetof(tracery_graph_frame, data) == sizeof(tracery_call), "tracery_graph_frame layout");

/// Runs at a traced function's entry. `data` points at this user's reserved words of the frame.
/// Return non-zero to have the exit handler called for this call.
typedef int (*tracery_graph_entry_handler)(
  tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
/// Runs when the call returns; `call->return_value` and `call->float_return` hold the result.
typedef void (*tracery_graph_exit_handler)(
  tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);

#ifdef __cplusplus
}
#endif
#endif
