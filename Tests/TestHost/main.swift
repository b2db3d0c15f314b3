// A single-threaded process the core tests drive: things that are only allowed while no other
// thread runs (rewriting gcc's 5×nop sleds) are tested here, in a process of our own.
//
//   tracery-testhost sleds LIBRARY PREFIX COUNT
//     loads LIBRARY, converts the sleds of PREFIX0..PREFIX<COUNT-1>, patches them all to counting
//     trampolines, calls each once through PREFIXtable, unpatches, and prints one result line.
//   tracery-testhost chain
//     installs a SIGTRAP handler of its own, lets the patcher install its handler on top, then
//     executes an int3 that is no patch site and raises SIGTRAP: both must reach the first handler.
//   tracery-testhost relocate-parked LIBRARY
//     a thread stopped by a fault inside r_parked's first bytes while r_parked is attached; prints
//     one result line.
//   tracery-testhost relocate-live LIBRARY
//     two threads call r_plain (built without NOPs) in a loop while it is traced by relocating its
//     prologue and untraced again, 200 times (threads stopped inside its first bytes are moved to
//     the copy); prints one result line.
//   tracery-testhost registers LIBRARY
//     loads LIBRARY (gcc -O2 without patch sites: mix/fmix keep values in call-clobbered
//     registers across calls of leaf/fleaf, fmix calls fleaf with rsp unaligned), attaches the
//     library's `clobber` handlers to leaf and fleaf through every kind of handler code
//     (per-function entry, exit, modify-return; ops; multi-attach per function and global),
//     calls mix and fmix under each, and prints one result line.
//   tracery-testhost relocate-multi LIBRARY PREFIX
//     loads LIBRARY (generated functions PREFIXn, built without NOPs, listed in PREFIXtable and
//     counted in PREFIXcount); two threads call them all in a loop while one entry handler is
//     attached to every one through the multi-attach global strategy (a bulk link of prologue
//     stubs) and detached, 50 times; prints one result line.
//   tracery-testhost relocate-parked[-multi] LIBRARY
//     a thread faults inside r_parked's first bytes and waits in its SIGSEGV handler while an
//     entry handler is attached to r_parked (by `attach`, or `attachMulti`'s global strategy);
//     then it is released; prints one result line.
//   tracery-testhost relocate-stale[-live] LIBRARY
//     a thread blocks in `read` with words that point inside r_parked's first bytes on its stack,
//     among them a signal frame's shape (a snapshot signal's, or with `-live` another signal's),
//     while an entry handler is attached to r_parked; prints one result line.
//   tracery-testhost relocate LIBRARY
//     loads LIBRARY (functions r_* (long, long) -> long, built without NOPs), attaches an entry and
//     an exit handler to all of them by relocating their prologues (or trap sites), calls each,
//     detaches, calls again, and prints one result line.
import CTraceryShims
import Glibc
import Synchronization
import TraceryCore
import TraceryELF
import TraceryX86

typealias Function = @convention(c) (Int) -> Int

func fail(_ message: String) -> Never {
  print("FAIL \(message)")
  exit(1)
}

nonisolated(unsafe) var previousHandlerCalls = 0

func chainTest() -> Never {
  var action = sigaction()
  action.__sigaction_handler.sa_handler = { _ in previousHandlerCalls += 1 }
  sigemptyset(&action.sa_mask)
  sigaction(SIGTRAP, &action, nil)
  do {
    // A batch with one (failing) request installs the patcher's handler over ours.
    let arena = CodeArena.shared
    let block = try arena.allocate(near: UInt64(UInt(bitPattern: dlsym(nil, "main"))), size: 16)
    var writer = X86Writer(base: block.address)
    writer.putInt3()
    writer.putMov(.rax, immediate: 7)
    writer.putRet()
    block.write(try writer.finish())
    _ = TextPatcher.shared.apply([
      PatchRequest(site: block.address, expected: [0, 0, 0, 0, 0], replacement: [0x0f, 0x1f, 0x44, 0, 0])
    ])
    let code = unsafeBitCast(UnsafeRawPointer(bitPattern: UInt(block.address))!, to: (@convention(c) () -> Int).self)
    let value = code()
    raise(SIGTRAP)
    print("int3=\(value) previous=\(previousHandlerCalls) handled=\(TrapStatistics.handled)")
    exit(0)
  } catch {
    fail("\(error)")
  }
}

typealias Function2 = @convention(c) (Int, Int) -> Int
nonisolated(unsafe) var entries = 0
nonisolated(unsafe) var exits = 0

func relocateTest(_ library: String) -> Never {
  guard let handle = dlopen(library, RTLD_NOW) else { fail("dlopen: \(String(cString: dlerror()))") }
  let names = [
    "r_plain", "r_branch", "r_loop", "r_call", "r_table", "r_stack", "r_recursive", "r_string", "r_spin", "r_short",
    "r_backward",
  ]
  let functions = names.map { unsafeBitCast(dlsym(handle, $0)!, to: Function2.self) }
  let addresses = names.map { UInt64(UInt(bitPattern: dlsym(handle, $0)!)) }
  let inputs = [(0, 5), (1, 2), (7, -3), (12, 40)]
  let expected = functions.map { function in inputs.map { function($0.0, $0.1) } }
  func bytes(_ address: UInt64) -> [UInt8] {
    Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(address)), count: 16))
  }
  let before = addresses.map(bytes)
  let tracer = Tracer.shared
  tracer.relocatesPrologues = true
  let model = FunctionModel(integerArguments: 2, stackArgumentWords: 0, returns: .integer)
  do {
    let entryLink = try tracer.attach(.entry({ _, _ in entries += 1 }), to: .glob("r_*"))
    let exitLink = try tracer.attach(.exit({ _, _ in exits += 1 }), to: .glob("r_*"), model: model)
    let relocated = addresses.indices.filter { bytes(addresses[$0]) != before[$0] }.count
    let traps = TextPatcher.shared.trapSites.count
    let trapsBefore = TrapStatistics.handled
    var wrong = 0
    for (index, function) in functions.enumerated()
    where inputs.indices.contains(where: {
      function(inputs[$0].0, inputs[$0].1) != expected[index][$0]
    }) {
      wrong += 1
    }
    let (tracedEntries, tracedExits) = (entries, exits)
    // Each call of the two trap sites' functions went through the SIGTRAP handler.
    let trapped = TrapStatistics.handled - trapsBefore >= 2 * UInt64(inputs.count)
    entryLink.detach()
    exitLink.detach()
    let restored = addresses.indices.filter { bytes(addresses[$0]) == before[$0] }.count
    for (index, function) in functions.enumerated()
    where inputs.indices.contains(where: {
      function(inputs[$0].0, inputs[$0].1) != expected[index][$0]
    }) {
      wrong += 1
    }
    let after = (entries, exits)
    print(
      "relocated=\(relocated) traps=\(traps) trapped=\(trapped) wrong=\(wrong) balanced=\(tracedEntries == tracedExits) "
        + "counted=\(tracedEntries >= names.count * inputs.count) restored=\(restored) "
        + "quiet=\(after == (tracedEntries, tracedExits)) freed=\(tracer.reclaim() >= 0 && tracer.retiredTrampolines == 0)"
    )
    exit(0)
  } catch {
    fail("\(error)")
  }
}

typealias Mix = @convention(c) (UnsafePointer<UInt32>, Int32) -> UInt32
typealias FloatMix = @convention(c) (UnsafePointer<Double>, Int32) -> Double

/// Every kind of handler code on functions built without patch sites, whose callers keep values
/// in call-clobbered registers and call them with rsp unaligned: each must keep every register
/// and align the stack (the library's handler sets every call-clobbered register to all ones and
/// faults on an unaligned stack).
func registersTest(_ library: String) -> Never {
  guard let handle = dlopen(library, RTLD_NOW) else { fail("dlopen: \(String(cString: dlerror()))") }
  func symbol<T>(_ name: String, _ type: T.Type) -> T { unsafeBitCast(dlsym(handle, name)!, to: type) }
  let mix = symbol("mix", Mix.self)
  let fmix = symbol("fmix", FloatMix.self)
  let clobber = symbol("clobber", EntryHandler.self)
  let clobberModify = symbol("clobber_modify", ModifyReturnHandler.self)
  let clobberSkip = symbol("clobber_skip", ModifyReturnHandler.self)
  let clobbers = dlsym(handle, "clobbers")!.assumingMemoryBound(to: UInt64.self)
  // leaf and fleaf are static (as registers.c's): the library exports their addresses.
  let exported: [String] = ["leaf_address", "fleaf_address"]
  let leaves = exported.map { name in dlsym(handle, name)!.assumingMemoryBound(to: UInt64.self).pointee }
  var integers: [UInt32] = (0..<13).map { UInt32($0 * 7 + 1) }
  var floats: [Double] = (0..<14).map { Double($0) * 0.25 + 1 }
  func results() -> (UInt32, Double) { (mix(&integers, 100), fmix(&floats, 20)) }
  let expected = results()
  let tracer = Tracer.shared
  tracer.relocatesPrologues = true
  let model = FunctionModel(integerArguments: 1, floatArguments: 1, stackArgumentWords: 0, returns: .unknown)
  let modes = [
    "entry", "exit", "modify-return", "modify-return-skip", "ops", "multi", "multi-global", "multi-global-joined",
  ]
  // Modes whose handler runs twice a call (two attachments).
  let twice: Set = ["multi-global-joined"]
  // The global strategy's functions join a bulk link through their prologue stubs: none is in
  // the general bookkeeping until another attachment joins it.
  var bulk = false
  /// Attaches `mode`'s handler to leaf and fleaf; returns its detach.
  func attach(_ mode: String) throws -> () -> Void {
    switch mode {
    case "entry":
      let link = try tracer.attach(.entry(clobber), to: .addresses(leaves))
      return { _ = link.detach() }
    case "exit":
      let link = try tracer.attach(.exit(clobber), to: .addresses(leaves), model: model)
      return { _ = link.detach() }
    case "modify-return":
      let link = try tracer.attach(.modifyReturn(clobberModify), to: .addresses(leaves), model: model)
      return { _ = link.detach() }
    case "modify-return-skip":
      // Precise models: with `.unknown`, a skipped body hands back all four result registers
      // from the call (rdx and xmm1 too), and a caller may keep values in those a callee does
      // not touch.
      let models = [
        FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer),
        FunctionModel(integerArguments: 0, floatArguments: 1, stackArgumentWords: 0, returns: .double),
      ]
      let links = try leaves.indices.map { index in
        try tracer.attach(
          .modifyReturn(clobberSkip), to: .address(leaves[index]), cookie: UInt64(index + 1), model: models[index])
      }
      return { for link in links { _ = link.detach() } }
    case "ops":
      let link = try tracer.attachOps(clobber, to: .addresses(leaves))
      return { _ = link.detach() }
    case "multi":
      let link = try tracer.attachMulti(.exit(clobber), to: .addresses(leaves), model: model, strategy: .perFunction)
      return { _ = link.detach() }
    case "multi-global":
      let link = try tracer.attachMulti(
        .entry(clobber), to: .addresses(leaves), model: model, strategy: .global(.hash))
      bulk = link.sites.count == 2 && tracer.siteShapes[.relocated] == nil
      return { _ = link.detach() }
    default:
      // Another attachment on functions of a bulk link: they leave it, keeping their copies.
      let link = try tracer.attachMulti(
        .entry(clobber), to: .addresses(leaves), model: model, strategy: .global(.automatic))
      let other = try tracer.attach(.entry(clobber), to: .addresses(leaves))
      return {
        _ = other.detach()
        _ = link.detach()
      }
    }
  }
  var wrong: [String] = []
  var quiet: [String] = []
  do {
    for name in modes {
      let before = clobbers.pointee
      let detach = try attach(name)
      let traced = results()
      if traced != expected { wrong.append(name) }
      if clobbers.pointee - before != (twice.contains(name) ? 2 : 1) * (100 * 13 + 20 * 14) { quiet.append(name) }
      detach()
    }
  } catch {
    fail("\(error)")
  }
  let untraced = results() == expected
  print(
    "modes=\(modes.count) wrong=\(wrong.joined(separator: ",")) uncounted=\(quiet.joined(separator: ",")) "
      + "untraced=\(untraced) bulk=\(bulk)")
  exit(0)
}

nonisolated(unsafe) var liveFunction: Function2?
let liveStop = Atomic<Bool>(false)
let liveWrong = Atomic<Int>(0)
let liveCalls = Atomic<Int>(0)

/// Two threads call r_plain (a * 3 + b; built without NOPs, with frame pointers: its first
/// instruction is a 1-byte push) in a loop while an entry and an exit handler are attached by
/// relocating its prologue and detached again, 200 times.
/// As a program starts: no signal blocked (the test runner that started us blocks some, and
/// threads inherit the mask).
func unblockSignals() {
  var none = sigset_t()
  sigemptyset(&none)
  sigprocmask(SIG_SETMASK, &none, nil)
}

/// What each caller thread does for one `n`: how many results were wrong.
nonisolated(unsafe) var callerPass: ((Int) -> Int)?

/// Two threads running `pass(n)` for n = 0, 1, ... until `liveStop`, adding its wrong results
/// to `liveWrong` and their passes to `liveCalls`.
func startCallers(_ pass: @escaping (Int) -> Int) -> [pthread_t] {
  callerPass = pass
  let worker: @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? = { _ in
    var n = 0
    while !liveStop.load(ordering: .relaxed) {
      let wrong = callerPass!(n)
      if wrong != 0 { liveWrong.add(wrong, ordering: .relaxed) }
      n += 1
    }
    liveCalls.add(n, ordering: .relaxed)
    return nil
  }
  return (0..<2).map { _ in
    var thread = pthread_t()
    pthread_create(&thread, nil, worker, nil)
    return thread
  }
}

nonisolated(unsafe) var multiFunctions: [Function] = []
let multiGood = Atomic<Int>(0)
let multiBad = Atomic<Int>(0)

func relocateMultiTest(_ library: String, prefix: String) -> Never {
  guard let handle = dlopen(library, RTLD_NOW) else { fail("dlopen: \(String(cString: dlerror()))") }
  unblockSignals()
  let count = dlsym(handle, "\(prefix)count")!.assumingMemoryBound(to: Int.self).pointee
  let table = dlsym(handle, "\(prefix)table")!.assumingMemoryBound(to: Function.self)
  multiFunctions = (0..<count).map { table[$0] }
  let entries = multiFunctions.map { UInt64(UInt(bitPattern: unsafeBitCast($0, to: UnsafeRawPointer.self))) }
  let original = entries.map { Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt($0)), count: 16)) }
  let threads = startCallers { n in
    multiFunctions.indices.count { multiFunctions[$0](n) != n &* ($0 % 97 + 3) &+ $0 }
  }
  let tracer = Tracer.shared
  tracer.relocatesPrologues = true
  // Each handler call must name its function's entry (its cookie).
  let handler: EntryHandler = { call, cookie in
    if call.pointee.function == cookie {
      multiGood.add(1, ordering: .relaxed)
    } else {
      multiBad.add(1, ordering: .relaxed)
    }
  }
  var joined = 0
  // Cycles whose functions all joined the bulk link (a cycle that began while a thread was in a
  // signal handler, its snapshot signal blocked, gives them int3 sites through the general path).
  var bulk = 0
  var restored = 0
  let cycles = 50
  do {
    for _ in 0..<cycles {
      let link = try tracer.attachMulti(
        .entry(handler), to: .addresses(entries), cookie: { $0 }, strategy: .global(.automatic))
      if link.sites.count == count { joined += 1 }
      if tracer.siteShapes.isEmpty { bulk += 1 }
      usleep(1_000)
      link.detach()
      if entries.indices.allSatisfy({
        Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(entries[$0])), count: 16)) == original[$0]
      }) {
        restored += 1
      }
    }
  } catch {
    fail("\(error)")
  }
  liveStop.store(true, ordering: .relaxed)
  for thread in threads { pthread_join(thread, nil) }
  _ = tracer.reclaim()
  print(
    "joined=\(joined) bulk=\(bulk) restored=\(restored) wrong=\(liveWrong.load(ordering: .relaxed)) "
      + "bad=\(multiBad.load(ordering: .relaxed)) called=\(multiGood.load(ordering: .relaxed) > 0)")
  exit(0)
}

func relocateLiveTest(_ library: String) -> Never {
  guard let handle = dlopen(library, RTLD_NOW), let symbol = dlsym(handle, "r_plain") else {
    fail("dlopen: \(String(cString: dlerror()))")
  }
  unblockSignals()
  let function = unsafeBitCast(symbol, to: Function2.self)
  liveFunction = function
  let site = PatchSite.afterEndbr64(UInt64(UInt(bitPattern: symbol)))
  let before = TextPatcher.read(site)
  let threads = startCallers { n in liveFunction!(n, 1) != n &* 3 &+ 1 ? 1 : 0 }
  let tracer = Tracer.shared
  tracer.relocatesPrologues = true
  let model = FunctionModel(integerArguments: 2, stackArgumentWords: 0, returns: .integer)
  var relocated = 0
  var restored = 0
  let cycles = 200
  do {
    for _ in 0..<cycles {
      let entryLink = try tracer.attach(
        .entry({ _, _ in entries += 1 }), to: .address(UInt64(UInt(bitPattern: symbol))))
      let exitLink = try tracer.attach(
        .exit({ _, _ in exits += 1 }), to: .address(UInt64(UInt(bitPattern: symbol))), model: model)
      if TextPatcher.read(site).first == 0xe9 { relocated += 1 }
      usleep(500)
      exitLink.detach()
      entryLink.detach()
      if TextPatcher.read(site) == before { restored += 1 }
    }
  } catch {
    fail("\(error)")
  }
  liveStop.store(true, ordering: .relaxed)
  for thread in threads { pthread_join(thread, nil) }
  print(
    "cycles=\(cycles) relocated=\(relocated) restored=\(restored) wrong=\(liveWrong.load(ordering: .relaxed)) "
      + "called=\(liveCalls.load(ordering: .relaxed) > cycles) moved=\(ctracery_threads_moved())")
  exit(0)
}

nonisolated(unsafe) var staleSite: UInt64 = 0
nonisolated(unsafe) var staleSignal: Int32 = 0
nonisolated(unsafe) var stalePipe: [Int32] = [0, 0]
let staleReady = Atomic<Bool>(false)
let staleThread = Atomic<Int32>(0)

/// A thread leaves words pointing inside r_parked's first 5 bytes on its stack — two bare ones
/// and a signal frame's shape (the restorer every handler returns through, the saved rip, the
/// signal number: `Reclaimer.SignalFrames`) — and blocks in `read` with them above its rsp while
/// r_parked is attached by relocating its prologue. A snapshot signal's frame is a dead one (its
/// handler answered and returned): the relocation goes ahead. With `live`, the frame names
/// another signal, whose handler could still be running: the relocation is abandoned (an int3).
func relocateStaleTest(_ library: String, live: Bool) -> Never {
  unblockSignals()
  guard let handle = dlopen(library, RTLD_NOW), let symbol = dlsym(handle, "r_parked") else {
    fail("dlopen: \(String(cString: dlerror()))")
  }
  staleSite = UInt64(UInt(bitPattern: symbol))
  staleSignal = live ? SIGUSR1 : ctracery_snapshot_signal()
  guard pipe(&stalePipe) == 0 else { fail("pipe") }
  let worker: @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? = { _ in
    var restorer: UInt64 = 0
    guard ctracery_signal_restorers(&restorer, 1) == 1 else { fail("no signal restorer") }
    withUnsafeTemporaryAllocation(of: UInt64.self, capacity: 128) { words in
      var local = 0
      let distance = withUnsafeMutablePointer(to: &local) { Int(bitPattern: $0) - Int(bitPattern: words.baseAddress!) }
      guard abs(distance) < 65536 else { fail("the words are not on the thread's stack") }
      words.initialize(repeating: 0)
      words[1] = staleSite + 1
      words[2] = staleSite + 4
      let base = UInt64(UInt(bitPattern: words.baseAddress!))
      let frame = (base + 8 * 4 + 15) / 16 * 16 + 8
      let at = Int(frame - base) / 8
      words[at] = restorer
      words[at + 22] = staleSite + 1
      UnsafeMutableRawPointer(words.baseAddress! + at).storeBytes(of: staleSignal, toByteOffset: 312, as: Int32.self)
      staleThread.store(ctracery_gettid(), ordering: .relaxed)
      staleReady.store(true, ordering: .relaxed)
      var byte: UInt8 = 0
      _ = read(stalePipe[0], &byte, 1)
      // The words stay live until here.
      if words[1] != staleSite + 1 { fail("words changed") }
    }
    return nil
  }
  var thread = pthread_t()
  pthread_create(&thread, nil, worker, nil)
  while !staleReady.load(ordering: .relaxed) { sched_yield() }
  // Blocked in `read` (system call 0; its registers then come from procfs, not a signal).
  func blocked() -> Bool {
    let descriptor = open("/proc/self/task/\(staleThread.load(ordering: .relaxed))/syscall", O_RDONLY)
    guard descriptor >= 0 else { return false }
    defer { close(descriptor) }
    var text: [UInt8] = [0, 0]
    return read(descriptor, &text, 2) == 2 && text == Array("0 ".utf8)
  }
  for _ in 0..<2000 where !blocked() { usleep(1000) }
  let tracer = Tracer.shared
  tracer.relocatesPrologues = true
  do {
    let link = try tracer.attach(.entry({ _, _ in entries += 1 }), to: .address(staleSite))
    let first = TextPatcher.read(PatchSite.afterEndbr64(staleSite)).first
    var byte: UInt8 = 1
    _ = write(stalePipe[1], &byte, 1)
    pthread_join(thread, nil)
    typealias Parked = @convention(c) (UnsafeMutableRawPointer?) -> Int
    var value = 41
    let result = unsafeBitCast(symbol, to: Parked.self)(&value)
    print("site=\(first == 0xcc ? "int3" : first == 0xe9 ? "relocated" : "?") result=\(result) traced=\(entries >= 1)")
    link.detach()
    exit(0)
  } catch {
    fail("\(error)")
  }
}

nonisolated(unsafe) var parkedPage: UnsafeMutableRawPointer?
let parkedFaulted = Atomic<Bool>(false)
let parkedRelease = Atomic<Bool>(false)
nonisolated(unsafe) var parkedResult = 0

/// A thread calls r_parked(page) on a page without access: it faults right after the function's
/// push and waits in its SIGSEGV handler (the signal frame holds the function's second byte)
/// while r_parked is attached by relocating its prologue; then it is released.
/// `multi`: the entry handler goes through the multi-attach global strategy (a bulk link, whose
/// abandoned relocation is left to the general path).
func relocateParkedTest(_ library: String, multi: Bool = false) -> Never {
  unblockSignals()
  guard let handle = dlopen(library, RTLD_NOW), let symbol = dlsym(handle, "r_parked") else {
    fail("dlopen: \(String(cString: dlerror()))")
  }
  typealias Parked = @convention(c) (UnsafeMutableRawPointer?) -> Int
  let function = unsafeBitCast(symbol, to: Parked.self)
  let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
  guard let page = mmap(nil, pageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), page != MAP_FAILED
  else { fail("mmap") }
  page.storeBytes(of: 41, as: Int.self)
  mprotect(page, pageSize, PROT_NONE)
  parkedPage = page
  var action = sigaction()
  action.__sigaction_handler.sa_sigaction = { _, _, _ in
    parkedFaulted.store(true, ordering: .relaxed)
    while !parkedRelease.load(ordering: .relaxed) { sched_yield() }
    mprotect(parkedPage, Int(sysconf(Int32(_SC_PAGESIZE))), PROT_READ)
  }
  action.sa_flags = SA_SIGINFO
  sigemptyset(&action.sa_mask)
  sigaction(SIGSEGV, &action, nil)
  let worker: @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? = { argument in
    let parked = unsafeBitCast(argument, to: Parked.self)
    parkedResult = parked(parkedPage)
    return nil
  }
  var thread = pthread_t()
  pthread_create(&thread, nil, worker, unsafeBitCast(function, to: UnsafeMutableRawPointer.self))
  while !parkedFaulted.load(ordering: .relaxed) { sched_yield() }
  let tracer = Tracer.shared
  tracer.relocatesPrologues = true
  let address = UInt64(UInt(bitPattern: symbol))
  do {
    let handler: EntryHandler = { _, _ in entries += 1 }
    let detach: () -> Void
    if multi {
      let link = try tracer.attachMulti(.entry(handler), to: .address(address), strategy: .global(.automatic))
      detach = { link.detach() }
    } else {
      let link = try tracer.attach(.entry(handler), to: .address(address))
      detach = { link.detach() }
    }
    let first = TextPatcher.read(PatchSite.afterEndbr64(address)).first
    parkedRelease.store(true, ordering: .relaxed)
    pthread_join(thread, nil)
    let later = function(page)
    print(
      "parked=true site=\(first == 0xcc ? "int3" : first == 0xe9 ? "relocated" : "?") parkedResult=\(parkedResult) "
        + "laterResult=\(later) traced=\(entries >= 1)")
    detach()
    exit(0)
  } catch {
    fail("\(error)")
  }
}

let arguments = CommandLine.arguments
if arguments.count == 2 && arguments[1] == "chain" { chainTest() }
if arguments.count == 3 && arguments[1] == "relocate-stale" { relocateStaleTest(arguments[2], live: false) }
if arguments.count == 3 && arguments[1] == "relocate-stale-live" { relocateStaleTest(arguments[2], live: true) }
if arguments.count == 3 && arguments[1] == "relocate-parked" { relocateParkedTest(arguments[2]) }
if arguments.count == 3 && arguments[1] == "relocate-parked-multi" { relocateParkedTest(arguments[2], multi: true) }
if arguments.count == 3 && arguments[1] == "relocate-live" { relocateLiveTest(arguments[2]) }
if arguments.count == 3 && arguments[1] == "relocate" { relocateTest(arguments[2]) }
if arguments.count == 4 && arguments[1] == "relocate-multi" { relocateMultiTest(arguments[2], prefix: arguments[3]) }
if arguments.count == 3 && arguments[1] == "registers" { registersTest(arguments[2]) }
guard arguments.count == 5, arguments[1] == "sleds", let count = Int(arguments[4]) else {
  fail("usage: tracery-testhost sleds LIBRARY PREFIX COUNT")
}
let (library, prefix) = (arguments[2], arguments[3])
guard let handle = dlopen(library, RTLD_NOW) else { fail("dlopen: \(String(cString: dlerror()))") }
let table = dlsym(handle, "\(prefix)table")!.assumingMemoryBound(to: Optional<Function>.self)
guard let entry = ProcessObjects.list().first(where: { $0.path == library }) else { fail("not loaded") }
let symbols: SymbolTable
do {
  symbols = try SymbolTable([SymbolTable.Input(path: library, bias: entry.bias, file: ELFFile(path: library))])
} catch { fail("\(error)") }
let sites = (0..<count).map { symbols.functions[symbols.functions(named: "\(prefix)\($0)")[0]].site! }
let shapesBefore = Set(sites.map { "\(ProcessObjects.shape(at: $0))" })

let converted = TextPatcher.shared.convertSleds(sites)
let convertedCount = converted.filter { $0 == .patched }.count
let nop5 = sites.map { TextPatcher.read($0) }
do {
  let probes = try CountingTrampolines(sites: sites, mode: .jmp)
  let patched = TextPatcher.shared.apply(
    sites.indices.map { PatchRequest(site: sites[$0], expected: nop5[$0], replacement: probes.branch($0)) })
  var wrong = 0
  for index in 0..<count where table[index]!(7) != 7 * (index % 97 + 3) + index { wrong += 1 }
  let counted = sites.indices.filter { probes.count($0) == 1 }.count
  let unpatched = TextPatcher.shared.apply(
    sites.indices.map { PatchRequest(site: sites[$0], expected: probes.branch($0), replacement: nop5[$0]) })
  let again = TextPatcher.shared.convertSleds(sites)
  print(
    "before=\(shapesBefore.sorted().joined(separator: ",")) converted=\(convertedCount) "
      + "patched=\(patched.filter { $0 == .patched }.count) wrong=\(wrong) counted=\(counted) "
      + "unpatched=\(unpatched.filter { $0 == .patched }.count) "
      + "after=\(Set(sites.map { "\(ProcessObjects.shape(at: $0))" }).sorted().joined(separator: ",")) "
      + "again=\(Set(again.map(\.description)).sorted().joined(separator: ","))")
} catch {
  fail("\(error)")
}
