import CTraceryShims

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
  typealias Backtrace = @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>?, Int32) -> Int32
  typealias UnwindBacktrace = @convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Int32
  static let nextBacktrace: Backtrace? = next("backtrace")
  static let nextUnwindBacktrace: UnwindBacktrace? = next("_Unwind_Backtrace")

  /// The addresses this object (TraceryCore, linked into a program or the agent) is loaded at:
  /// from its ELF header and program headers in memory (its base from `dladdr`, once).
  static let ownExtent: Range<UInt> = {
    let probe = unsafeBitCast(nextBacktraceProbe, to: UnsafeRawPointer.self)
    guard let base = ctracery_object_base(probe) else { return 0..<0 }
    let header = UnsafeRawPointer(base)
    let programHeaders = Int(header.loadUnaligned(fromByteOffset: 32, as: UInt64.self))
    let count = Int(header.loadUnaligned(fromByteOffset: 56, as: UInt16.self))
    var end: UInt = 0
    for index in 0..<count {
      let entry = header + programHeaders + index * 56
      guard entry.loadUnaligned(as: UInt32.self) == 1 else { continue }  // PT_LOAD
      let address = UInt(entry.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
      let size = UInt(entry.loadUnaligned(fromByteOffset: 40, as: UInt64.self))
      end = max(end, address + size)
    }
    let start = UInt(bitPattern: base)
    return start..<(start + end)
  }()
  private static let nextBacktraceProbe: @convention(c) () -> Void = {}

  /// The unwinder's `name` (`_Unwind_…`), or another library's (`backtrace`): the definition after
  /// this library's in the lookup order, else in an unwinder loaded outside the global scope (a
  /// C program's C++ plugin opened with RTLD_LOCAL) or, for an exception thrown where none is
  /// loaded (inside the agent), loaded now (`ctracery_next_symbol`).
  static func next<T>(_ name: String) -> T? {
    ctracery_next_symbol(name, CTRACERY_IN_UNWINDER).map { unsafeBitCast($0, to: T.self) }
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

// MARK: - Backtraces through traced frames

// `backtrace()` (a crash handler's, a logger's) and `_Unwind_Backtrace` (libbacktrace,
// std::stacktrace) stopped at the first traced call's swapped return address: the walk runs with
// the real ones in place, and the graph's go back after it (the stack is as it was: every frame
// stays).

@_cdecl("backtrace")
public func traceryBacktrace(_ buffer: UnsafeMutablePointer<UnsafeMutableRawPointer?>?, _ size: Int32) -> Int32 {
  guard let buffer, size > 0, let next = UnwindGuard.nextBacktrace else { return 0 }
  // The frames of this object (this interposer's, the agent's `__libc_start_main`) are left out:
  // the caller sees what it sees untraced. A few more are asked for in their place.
  let own = UnwindGuard.ownExtent
  let capacity = Int(size) + 8
  return withUnsafeTemporaryAllocation(of: UnsafeMutableRawPointer?.self, capacity: capacity) { frames in
    let count = Int(Tracer.withRealReturnAddresses { next(frames.baseAddress, Int32(capacity)) })
    var kept = 0
    for index in 0..<max(0, count) where kept < Int(size) {
      let address = UInt(bitPattern: frames[index])
      if own.contains(address) { continue }
      buffer[kept] = frames[index]
      kept += 1
    }
    return Int32(kept)
  }
}

@_cdecl("_Unwind_Backtrace")
public func traceryUnwindBacktrace(_ trace: UnsafeMutableRawPointer?, _ argument: UnsafeMutableRawPointer?) -> Int32 {
  Tracer.withRealReturnAddresses { UnwindGuard.nextUnwindBacktrace?(trace, argument) ?? 5 }
}
