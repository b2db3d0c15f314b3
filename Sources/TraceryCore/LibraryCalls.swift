import TraceryELF
import TraceryX86

#if canImport(Glibc)
  import Glibc
#endif

/// Calls from an object to functions of other objects through its PLT (`printf`, `malloc`,
/// `pthread_create`), made traceable without touching any code (uftrace records them by
/// default): each import's GOT slot is pointed at a stub of ours,
///
///     stub:  nop5                 (an ordinary patch site: any tracer traces it as a function)
///            jmp [rip + target]   (the function the slot held)
///
/// so a call through the PLT enters the stub, and the tracer's branch at its NOP sees the call
/// with its caller's return address, as if the library function itself had a site.
///
/// Protocol: installed at the agent's start, after the dynamic linker bound every slot
/// (`LD_BIND_NOW`, which `tracery record` sets), or in a running process (`record -p`), where
/// only the slots bound so far are taken: a slot still pointing into its own object (lazy binding
/// not done yet) is left alone, since the resolver would write over the stub. Each slot is one
/// aligned 8-byte store, so a thread calling through it meanwhile reaches the function either
/// way. `uninstall` puts the slots back (a detach); the stubs stay for the process's life (a
/// thread may be in one).
///
/// Left out: functions that do not return once to their caller on the same stack (`setjmp` and
/// `vfork` return twice, `longjmp` and `exit` never, `__cxa_throw` unwinds, context switches),
/// where a traced call frame would be wrong; `fork` (it returns in two processes). Swift's
/// concurrency entry points and async functions are recorded like any call: they enter by tail
/// calls and return with `ret 8` (the function graph follows both).
public enum LibraryCalls {
  public struct Stub: Sendable, Equatable {
    /// The imported function's name.
    public let name: String
    /// The stub's patch site (its address).
    public let site: UInt64
    /// The GOT slot pointed at the stub, and what it held (the function).
    public let slot: UInt64
    public let target: UInt64
  }

  /// Whether calls of `name` are left out (above). A switch, not a `Set`: built at first use in
  /// every traced process, the set's hashing was ~1% of a child's start.
  static func isSkipped(_ name: String) -> Bool {
    switch name {
    case "__libc_start_main", "exit", "_exit", "_Exit", "quick_exit", "abort", "longjmp", "_longjmp", "siglongjmp",
      "__longjmp_chk", "setjmp", "_setjmp", "sigsetjmp", "__sigsetjmp", "vfork", "clone", "clone3", "__cxa_throw",
      "__cxa_rethrow", "_Unwind_Resume", "_Unwind_RaiseException", "_Unwind_ForcedUnwind", "getcontext",
      "setcontext", "swapcontext", "makecontext", "pthread_exit", "__stack_chk_fail", "__assert_fail",
      "__fortify_fail", "__chk_fail", "err", "errx", "verr", "verrx":
      return true
    // Returns in two processes: the child's first event would close a call its parent's file opened.
    case "fork", "_Fork":
      return true
    // Ends an unwind: TraceryCore's interposer closes the unwound calls in it (`UnwindGuard`). A
    // traced call of it would enter first, and its entry would drop them as stale, unclosed; and
    // the interposer would take its live frame for one of them.
    case "__cxa_begin_catch":
      return true
    // Take their caller from their return address, which a recorded call makes the stub's: the
    // dynamic loader's (dlsym(RTLD_NEXT) found nothing), the profilers' counting hooks.
    case "dlsym", "dlvsym", "dlopen", "dlmopen", "mcount", "_mcount", "__fentry__":
      return true
    default:
      return false
    }
  }

  /// A sanitizer runtime's entry that instrumented code calls (`__asan_init`, `__tsan_init`, …).
  static func isSanitizerRuntime(_ name: String) -> Bool { sanitizerRuntimes.contains { name.hasPrefix($0) } }
  private static let sanitizerRuntimes = ["__asan_", "__tsan_", "__msan_", "__hwasan_"]

  /// A sanitizer's or profiler's runtime entry (`__asan_report_load8`, `__ubsan_handle_*`,
  /// `__sanitizer_cov_trace_pc`): instrumentation the compiler added, not the program's calls;
  /// several report or count by their return address.
  static func isInstrumentation(_ name: String) -> Bool { instrumentation.contains { name.hasPrefix($0) } }
  private static let instrumentation =
    sanitizerRuntimes + ["__ubsan_", "__lsan_", "__sanitizer_", "__cyg_profile_func_"]

  /// The stub's size (a 5-byte NOP, a 6-byte `jmp [rip + disp32]`, padding) and its target
  /// word's.
  static let stubSize = 16

  /// Points every PLT slot of the object at `path` (loaded at `bias`) at a stub, and returns the
  /// stubs (empty when it imports nothing through its PLT, or its slots are not bound yet).
  /// `traced`: functions traced anyway (a patchable library's), whose slots are left alone too:
  /// their calls would show twice, `f@plt() { f() }`.
  public static func install(
    path: String, bias: UInt64, arena: CodeArena = .shared, traced: (UInt64) -> Bool = { _ in false }
  ) throws -> [Stub] {
    // Its relocations and dynamic symbols, not its code (clang's file is 140 MB, 130 of it code).
    let file = try ELFFile(pathWithoutCode: path)
    let all = try file.importSlots()
    // An object built with a sanitizer that calls its runtime through the PLT (gcc's
    // libasan.so): the runtime's interceptors take their stacks by frame pointers from the
    // return addresses (an allocation's stack stopped at a recorded `malloc`), so its calls
    // are left alone.
    guard !all.contains(where: { isSanitizerRuntime($0.name) }) else { return [] }
    let imports = all.filter {
      !isSkipped($0.name) && !isInstrumentation($0.name)
    }
    let map = MemoryMap.current()
    // A bound slot holds an address outside the object's own mappings (the resolver's path
    // points into its PLT).
    let objectRange = objectExtent(file, bias: bias)
    var chosen: [(name: String, slot: UInt64, target: UInt64)] = []
    for entry in imports {
      let slot = entry.slot &+ bias
      guard slot % 8 == 0, map.region(containing: slot)?.readable == true else { continue }
      let target = UnsafePointer<UInt64>(bitPattern: UInt(slot))!.pointee
      guard target != 0, !objectRange.contains(target), !traced(target) else { continue }
      chosen.append((entry.name, slot, target))
    }
    guard !chosen.isEmpty else { return [] }
    let size = chosen.count * (stubSize + 8)
    let block = try arena.allocate(near: objectRange.lowerBound, size: size)
    var bytes: [UInt8] = []
    bytes.reserveCapacity(size)
    let targets = chosen.count * stubSize
    for index in chosen.indices {
      let stub = block.address + UInt64(index * stubSize)
      let word = block.address + UInt64(targets + index * 8)
      bytes += X86Instruction.nop5
      bytes += [0xff, 0x25]
      withUnsafeBytes(of: Int32(truncatingIfNeeded: Int64(bitPattern: word &- (stub + 11))).littleEndian) {
        bytes += $0
      }
      bytes += [UInt8](repeating: 0xcc, count: stubSize - 11)
    }
    for entry in chosen { withUnsafeBytes(of: entry.target.littleEndian) { bytes += $0 } }
    block.write(bytes)
    var written: [Stub] = []
    for (index, entry) in chosen.enumerated() {
      let stub = block.address + UInt64(index * stubSize)
      if exchange(slot: entry.slot, with: stub, map: map) != nil {
        written.append(Stub(name: entry.name, site: stub, slot: entry.slot, target: entry.target))
      }
    }
    return written
  }

  /// Puts back each of `stubs`' slots that still points at its stub (the function it held).
  public static func uninstall(_ stubs: [Stub]) {
    let map = MemoryMap.current()
    for stub in stubs {
      _ = exchange(slot: stub.slot, with: stub.target, ifHolding: stub.site, map: map)
    }
  }

  /// Stores `value` into the GOT slot at `slot` (one aligned store, as `install` does) and returns
  /// what it held; with `ifHolding`, only when it held that. nil: nothing stored (the slot is not
  /// aligned, readable and writable, or held something else).
  public static func exchange(slot: UInt64, with value: UInt64, ifHolding expected: UInt64? = nil) -> UInt64? {
    exchange(slot: slot, with: value, ifHolding: expected, map: MemoryMap.current())
  }

  static func exchange(slot: UInt64, with value: UInt64, ifHolding expected: UInt64? = nil, map: MemoryMap)
    -> UInt64?
  {
    guard slot % 8 == 0, let region = map.region(containing: slot), region.readable,
      let held = UnsafePointer<UInt64>(bitPattern: UInt(slot))?.pointee, expected == nil || held == expected
    else { return nil }
    return write(value, toSlot: slot, region: region) ? held : nil
  }

  /// One aligned store into a slot in `region`: RELRO (read-only once bound: made writable for
  /// it) or writable data.
  private static func write(_ value: UInt64, toSlot slot: UInt64, region: MemoryMap.Region) -> Bool {
    let page = UnsafeMutableRawPointer(bitPattern: UInt(System.pageStart(slot)))
    let pageSize = Int(System.pageSize)
    let restore = (region.readable ? PROT_READ : 0) | (region.writable ? PROT_WRITE : 0)
    if !region.writable {
      guard mprotect(page, pageSize, PROT_READ | PROT_WRITE) == 0 else { return false }
    }
    UnsafeMutablePointer<UInt64>(bitPattern: UInt(slot))!.pointee = value
    if !region.writable { mprotect(page, pageSize, restore) }
    return true
  }

  /// The object's loaded extent (runtime addresses), from its loadable segments.
  static func objectExtent(_ file: ELFFile, bias: UInt64) -> Range<UInt64> {
    let loads = file.segments.filter { $0.type == ELFConstants.PT_LOAD }
    let low = loads.map(\.virtualAddress).min() ?? 0
    let high = loads.map { $0.virtualAddress + $0.memorySize }.max() ?? 0
    return (low &+ bias)..<(high &+ bias)
  }
}
