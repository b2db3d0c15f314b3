#if canImport(Glibc)
  import Glibc
#endif

// MARK: - Exceptions through traced frames

/// C++ exceptions and forced unwinds (`pthread_exit`, cancellation) walk the stack with the
/// unwinder, which cannot step through a return address the graph swapped for its stub's (the
/// real one is on the shadow stack, which DWARF cannot describe). TraceryCore interposes the
/// unwinder's entry points: a program that links it (or preloads the agent, which does) defines
/// them before libgcc_s in the lookup order. Before the walk, every live frame of this thread's
/// shadow stack gets its real return address back (`_Unwind_RaiseException`, a rethrow's
/// `_Unwind_Resume_or_Rethrow`, `_Unwind_ForcedUnwind`). When the exception is caught, the
/// `__cxa_begin_catch` interposer (in CTraceryShims: it needs its caller's exact stack pointer)
/// swaps the graph's return address back into the frames that survived, so their exits are still
/// given; unwound calls get none (as for `longjmp`; the recorder's reader marks them "no exit
/// recorded"). The program behaves exactly as untraced. Without a shadow stack (the graph never
/// used on this thread) the interposers only forward.
enum UnwindGuard {
  typealias RaiseException = @convention(c) (UnsafeMutableRawPointer?) -> Int32
  typealias ForcedUnwind =
    @convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Int32

  static let nextRaise: RaiseException? = next("_Unwind_RaiseException")
  static let nextForced: ForcedUnwind? = next("_Unwind_ForcedUnwind")
  static let nextRethrow: RaiseException? = next("_Unwind_Resume_or_Rethrow")

  static func next<T>(_ name: String) -> T? {
    // RTLD_NEXT: the definition after this library's in the lookup order (libgcc_s).
    dlsym(UnsafeMutableRawPointer(bitPattern: -1), name).map { unsafeBitCast($0, to: T.self) }
  }
}

@_cdecl("_Unwind_RaiseException")
public func traceryUnwindRaiseException(_ exception: UnsafeMutableRawPointer?) -> Int32 {
  Tracer.restoreReturnAddresses()
  return UnwindGuard.nextRaise?(exception) ?? 5  // _URC_END_OF_STACK
}

@_cdecl("_Unwind_Resume_or_Rethrow")
public func traceryUnwindResumeOrRethrow(_ exception: UnsafeMutableRawPointer?) -> Int32 {
  Tracer.restoreReturnAddresses()
  return UnwindGuard.nextRethrow?(exception) ?? 5
}

@_cdecl("_Unwind_ForcedUnwind")
public func traceryUnwindForcedUnwind(
  _ exception: UnsafeMutableRawPointer?, _ stop: UnsafeMutableRawPointer?, _ argument: UnsafeMutableRawPointer?
) -> Int32 {
  Tracer.restoreReturnAddresses()
  return UnwindGuard.nextForced?(exception, stop, argument) ?? 5
}
