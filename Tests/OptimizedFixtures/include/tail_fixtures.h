// Functions built as programs ship (-O2, sibling calls on, -fpatchable-function-entry=5): the
// compiler turns `return f(x);` into `jmp f`, so a traced function enters another traced
// function with its own return-address slot. `tracery_tail_jumps` checks that it did.
#ifndef TRACERY_TAIL_FIXTURES_H
#define TRACERY_TAIL_FIXTURES_H
#ifdef __cplusplus
extern "C" {
#endif

/// top(x) = mid(2x) and mid(x) = leaf(x + 1), both tail calls; leaf(x) = 3x + 1.
long tracery_tail_top(long x);
long tracery_tail_mid(long x);
long tracery_tail_leaf(long x);
/// outer(x) = top(x) + 1000 (an ordinary call, so the chain has a traced caller).
long tracery_tail_outer(long x);
/// via(x) = bridge(x + 2), bridge untraced (no patch site), bridge(x) = leaf(x * 5): a tail
/// call that reaches a traced function through untraced code.
long tracery_tail_via(long x);
/// even(n) / odd(n): mutual recursion through tail calls; even(n) is 1 when n is even.
long tracery_tail_even(long n);
long tracery_tail_odd(long n);
/// Calls jumper_mid(x), which tail-calls jumper_leaf(x + 1), which longjmps back here when its
/// argument is positive (else returns twice it); then calls leaf(x) from the same stack level
/// and returns its result (3x + 1; -1 if no longjmp came).
long tracery_tail_longjmp(long x);
long tracery_tail_jumper_mid(long x);
long tracery_tail_jumper_leaf(long x);

/// Swift's async calling convention (`swiftasynccall`, which clang compiles from C too): the
/// context in r14, and every function pops an 8-byte argument area with its return (`ret 8`)
/// while its caller takes 8 off rsp after the call. async_run(x) calls async_mid(box of x),
/// which adds 2 and tail-calls async_leaf, which adds 3: x + 5. The `plain_` ones are the same
/// without patch sites (traced by relocating their prologues, or an int3).
long tracery_async_run(long x);
long tracery_async_plain_run(long x);
/// An async function with two stack arguments that adds the first to the box and tail-calls
/// async_plain_leaf, moving the return address 16 bytes up as Swift does for a callee with fewer
/// stack arguments (it pops 24 bytes in all).
void tracery_async_mover(void);
/// An async function without stack arguments that tail-calls the mover with 2 and 0, moving the
/// return address 16 bytes down (the mover moves it back up): x + 5, popping 8.
void tracery_async_grower(void);
/// Calls `callee` (an async function) with a box of x in r14 and `argument`, 0 on the stack, as
/// Swift's executor calls one that pops `popped` bytes above its return address (8 for
/// async_mid, 24 for the mover), with a live word of its own right above them: the box after
/// the call, or -1 if the call changed that word.
long tracery_async_checked_call(long x, const void *callee, long argument, long popped);
/// The async functions' addresses (their type is not one Swift can import).
const void *tracery_async_functions(int plain, const void **mid, const void **leaf);

/// C++: throw_top(v) = throw_mid(v + 1) = thrower(v + 2), tail calls; thrower(v) throws v
/// when v > 100, else returns 7v.
long tracery_tail_throw_top(long v);
long tracery_tail_throw_mid(long v);
long tracery_tail_thrower(long v);
/// Calls throw_top(v) in try/catch: the caught value, or the result + 1000.
long tracery_tail_catch(long v);
/// into_catcher(v) = catcher(2v) (a tail call); catcher calls thrower(v) in try/catch and
/// returns -(the caught value), or the result + 1.
long tracery_tail_into_catcher(long v);
long tracery_tail_catcher(long v);

/// Whether the function at `from` ends its body with `jmp to` (a tail call), looking at its
/// first `length` bytes.
int tracery_tail_jumps(const void *from, const void *to, int length);

#ifdef __cplusplus
}
#endif
#endif
