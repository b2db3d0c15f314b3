import CTracery
import CTraceryShims
import Synchronization
import TraceryX86

#if canImport(Glibc)
  import Glibc
#endif

/// A graph user's entry handler (C or Swift): return non-zero to have `GraphExitHandler` called
/// when this call returns. `data` points at the user's reserved words of the frame.
public typealias GraphEntryHandler =
  @convention(c) (
    UnsafeMutablePointer<tracery_graph_frame>, UnsafeMutablePointer<UInt64>, UnsafeMutablePointer<tracery_call>,
    UInt64
  ) -> Int32
/// A graph user's exit handler: `call.return_value` / `float_return` hold the result (and may be
/// changed).
public typealias GraphExitHandler =
  @convention(c) (
    UnsafeMutablePointer<tracery_graph_frame>, UnsafeMutablePointer<UInt64>, UnsafeMutablePointer<tracery_call>,
    UInt64
  ) -> Void

/// Called for a frame a caught C++ exception unwound (see `Tracer.unwoundHandler`).
public typealias UnwoundHandler = @convention(c) (UnsafeMutablePointer<tracery_graph_frame>) -> Void

/// What a function-graph user runs (as in the kernel's fgraph: up to 16 users share every frame).
public enum GraphHandlers: Sendable {
  /// Handlers; either may be nil. Without an entry handler every call's exit is taken.
  case handlers(entry: GraphEntryHandler?, exit: GraphExitHandler?)
  /// The built-in event recorder (at most one per process): writes an event at each entry (16
  /// bytes) and exit (8 bytes) into the thread's event buffer
  /// (`ctracery_thread.event_cursor..event_end`) with no call, and calls `refill` (with the
  /// recursion guard held) when `cursor >= end`. The layout is TraceryRecord's `Event` (and
  /// docs/trace-format.md); `refill` must leave room for a 16-byte entry below every `end`.
  case recorder(refill: @convention(c) () -> Void)

  var isRecorder: Bool { if case .recorder = self { true } else { false } }
}

/// One function-graph user. Keep it to keep the user attached; `detach()` removes it.
public final class GraphLink: Sendable {
  let tracer: Tracer
  /// The user's bit in every frame's `taken` word.
  public let index: Int
  /// The user's reserved words: `data[0 ..< dataWords]` in the handlers' `data` argument,
  /// which points at `frame.data[dataOffset]`.
  public let dataOffset: Int
  public let dataWords: Int
  /// What the attach that made this link did to each function (`attachGraph`).
  let attachReport = Mutex(TransactionReport())

  init(tracer: Tracer, index: Int, dataOffset: Int, dataWords: Int) {
    self.tracer = tracer
    self.index = index
    self.dataOffset = dataOffset
    self.dataWords = dataWords
  }

  /// The functions the attach that made this link could not trace, and why.
  public var attachFailures: [TransactionReport.Entry] { attachReport.withLock { $0.failures } }

  /// Sites (patch-site addresses) this user traces now.
  public var sites: [UInt64] { tracer.graphSites(of: index) }

  /// Adds functions to this user in one batch (those of an object loaded later, say).
  @discardableResult
  public func add(_ selector: FunctionSelector) throws(AttachError) -> TransactionReport {
    let targets = try tracer.resolve(selector)
    return tracer.commit([.graphAttach(index, targets, nil)])
  }

  /// Removes the functions at `sites` from this user in one batch (an object about to be
  /// unloaded, say); calls of theirs in flight end untraced.
  @discardableResult
  public func remove(sites: [UInt64]) -> TransactionReport { tracer.commit([.graphRemoveSites(index, sites)]) }

  /// Removes the user from every function in one batch. Calls in flight are not given to its
  /// exit handler any more. Detaching twice does nothing.
  @discardableResult
  public func detach() -> TransactionReport { tracer.commit([.graphDetach(index)]) }
}

/// A user of the graph as the tracer keeps it.
struct GraphUser {
  let handlers: GraphHandlers
  let cookie: UInt64
  let dataOffset: Int
  let dataWords: Int
  let depthLimit: Int?
  let vectorRegisters: Bool

  func code(index: Int) -> GraphUserCode {
    let kind: GraphUserCode.Kind
    switch handlers {
    case .handlers(let entry, let exit):
      kind = .handlers(entry: entry.map(address), exit: exit.map(address), cookie: cookie)
    case .recorder(let refill):
      kind = .recorder(refill: address(refill))
    }
    return GraphUserCode(
      index: index, kind: kind, dataOffset: dataOffset, depthLimit: depthLimit,
      vectorRegisters: vectorRegisters && !handlers.isRecorder,
      generationAddress: GraphThreads.generationAddress(index), generation: GraphThreads.generation(index))
  }

}

private func address<T>(_ function: T) -> UInt64 {
  UInt64(UInt(bitPattern: unsafeBitCast(function, to: UnsafeRawPointer.self)))
}

extension tracery_graph_frame {
  /// The return-address slot of the frame's call on the thread's stack.
  var slot: UInt64 { stack_arguments &- 8 }
}

/// One graph image (the entry and return handler of a mask and a function model) and where it
/// lives.
struct GraphImage {
  let mask: UInt16
  let model: FunctionModel
  let preservesAll: Bool
  let returnHandler: UInt64
  let image: CodeImage
  var entry: UInt64 { image.block.address }
}

/// Per-thread shadow stacks and the user slots' generation words.
///
/// Protocol: a thread's `ctracery_thread` is touched only by that thread (generated code and
/// `setupThread`), and by `releaseThread` when it exits. The generation words are written under
/// the tracer's lock and read by generated code (plain aligned 64-bit loads and stores).
enum GraphThreads {
  /// Frames per thread: 65,536 (22 MiB of address space, reserved with MAP_NORESERVE and touched
  /// only as deep as calls go).
  static let frames = 1 << 16
  nonisolated(unsafe) static let generations: UnsafeMutablePointer<UInt64> = {
    let words = UnsafeMutablePointer<UInt64>.allocate(capacity: 16)
    words.initialize(repeating: 1, count: 16)
    return words
  }()

  static func generationAddress(_ index: Int) -> UInt64 { UInt64(UInt(bitPattern: generations + index)) }
  static func generation(_ index: Int) -> UInt64 { generations[index] }
  static func advanceGeneration(_ index: Int) { generations[index] &+= 1 }

  static let key: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { _ in GraphThreads.releaseThread() }
    return key
  }()

  /// Called by generated code (`void setup(void)`, guard held) on a thread's first traced call.
  /// The mapping holds the frames, then one word per frame for `restoreReturnAddresses`.
  static let setupThread: @convention(c) () -> Void = {
    let state = ctracery_thread_state()!
    guard state.pointee.shadow_top == 0 else { return }
    // A sandboxed process (seccomp): no mapping may be asked for; the thread is never traced.
    guard ctracery_sandboxed().pointee == 0 else {
      state.pointee.shadow_top = 1
      return
    }
    _ = catchHookInstalled
    let size = GraphThreads.frames * (Int(GraphEmitter.frameSize) + 8)
    let memory = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    guard let memory, memory != MAP_FAILED else {
      state.pointee.shadow_top = 1  // disabled: never traced
      return
    }
    let sentinel = memory.assumingMemoryBound(to: tracery_graph_frame.self)
    sentinel.pointee.stack_arguments = .max
    sentinel.pointee.depth = .max
    let base = UInt64(UInt(bitPattern: memory))
    state.pointee.shadow_base = base
    state.pointee.shadow_size = UInt64(size)
    state.pointee.shadow_top = base + UInt64(GraphEmitter.frameSize)
    // One frame short of the mapping's frames: room for the guard frame a rotating return
    // writes at top (`GraphEmitter.putRotate`).
    state.pointee.shadow_limit = base + UInt64((GraphThreads.frames - 1) * Int(GraphEmitter.frameSize))
    if !setMainThreadStack(state) { ctracery_set_thread_stack(state) }
    ctracery_register_shadow_thread(state)
    pthread_setspecific(GraphThreads.key, UnsafeRawPointer(bitPattern: 1))
  }

  /// The main thread's stack bounds from the last memory map read (the agent's start read one),
  /// as glibc would give them: its `pthread_getattr_np` reads `/proc/self/maps` for the main
  /// thread (~60 µs of every traced process's start). The mapping that holds the stack does not
  /// move, and the kernel places other mappings below the gap the stack limit keeps free, so
  /// the mapping below it is the one the map saw. false (nothing set) on another thread, with
  /// no stack limit (the kernel then maps upwards, towards the stack, and glibc's answer reaches
  /// down to whatever was mapped last), or when this thread's stack pointer is not in that
  /// mapping (a forked child of another thread; a program running `main` on a stack of its own).
  static func setMainThreadStack(_ state: UnsafeMutablePointer<ctracery_thread>) -> Bool {
    guard ctracery_gettid() == getpid() else { return false }
    var limit = rlimit()
    guard getrlimit(Int32(RLIMIT_STACK.rawValue), &limit) == 0, limit.rlim_cur != rlim_t.max else { return false }
    var here = 0
    let stackPointer = withUnsafeMutablePointer(to: &here) { UInt64(UInt(bitPattern: $0)) }
    let map = MemoryMap.recent()
    guard
      let stack = map.mainThreadStack(stackEnd: ctracery_libc_stack_end(), limit: UInt64(limit.rlim_cur)),
      stackPointer >= stack.low, stackPointer < stack.high
    else { return false }
    state.pointee.stack_low = stack.low
    state.pointee.stack_high = stack.high
    return true
  }

  /// Whether `stackPointer` lies on this thread's own stack (not on an alternate signal stack).
  static func onThreadStack(_ stackPointer: UInt64) -> Bool {
    let state = ctracery_thread_state()!.pointee
    return stackPointer >= state.stack_low && stackPointer < state.stack_high
  }

  /// At thread exit: frees the shadow stack and disables tracing for what runs after.
  static func releaseThread() {
    let state = ctracery_thread_state()!
    let base = state.pointee.shadow_base
    state.pointee.shadow_top = 1
    state.pointee.shadow_limit = 0
    ctracery_unregister_shadow_thread(state)
    // (Sandboxed: kept mapped, no system call.)
    if base != 0, ctracery_sandboxed().pointee == 0 {
      munmap(UnsafeMutableRawPointer(bitPattern: UInt(base)), Int(state.pointee.shadow_size))
    }
    state.pointee.shadow_base = 0
  }

  /// This thread's live frames in calls, bottom first: a call is the frames that share one
  /// return-address slot (a function and the traced functions it tail-called, in order). The
  /// body gets the call's bottom frame (its return address is the real one) and the saved word
  /// of its top frame. Allocates nothing (it runs inside the unwinder).
  private static func calls(
    _ body: (_ bottom: UnsafeMutablePointer<tracery_graph_frame>, _ saved: UnsafeMutablePointer<UInt64>) -> Void
  ) {
    let state = ctracery_thread_state()!
    let size = UInt64(GraphEmitter.frameSize)
    let base = state.pointee.shadow_base
    guard base != 0, state.pointee.shadow_top > base + size else { return }
    let saved = UnsafeMutablePointer<UInt64>(bitPattern: UInt(base + UInt64(frames) * size))!
    let count = Int((state.pointee.shadow_top - base) / size)
    func frame(_ index: Int) -> UnsafeMutablePointer<tracery_graph_frame> {
      UnsafeMutablePointer(bitPattern: UInt(base + UInt64(index) * size))!
    }
    var bottom = 1
    while bottom < count {
      var top = bottom
      while top + 1 < count, frame(top + 1).pointee.slot == frame(bottom).pointee.slot { top += 1 }
      body(frame(bottom), saved + top)
      bottom = top + 1
    }
  }

  /// Puts the real return address back into every slot of this thread's stack the graph swapped,
  /// for calls whose slot lies above `stackPointer` (below it: calls that already ended, by
  /// longjmp), remembering what was there. The real one is the bottom frame's of the call: in a
  /// tail call the slot holds the last callee's stub and its frame returns into the caller's
  /// stub. The frames stay: `restoreAfterCatch` swaps the survivors back in once the unwind ends
  /// in a catch. (Without one, they return untraced and are dropped as stale by later traced
  /// calls.)
  static func restoreReturnAddresses(above stackPointer: UInt64) {
    calls { bottom, saved in
      let call = bottom.pointee
      let slot = UnsafeMutablePointer<UInt64>(bitPattern: UInt(call.slot))!
      guard call.slot > stackPointer, slot.pointee != call.return_address else { return }
      saved.pointee = slot.pointee
      slot.pointee = call.return_address
    }
  }

  /// Runs `walk` (a backtrace, which leaves the stack as it was) with the real return address in
  /// every slot above `stackPointer`, then puts the graph's back into the slots this call
  /// restored, dropping no frame. Slots an unwind under way restored (a destructor it runs is
  /// calling `backtrace`) stay as the unwinder needs them.
  static func withRealReturnAddresses<T>(above stackPointer: UInt64, _ walk: () -> T) -> T {
    var count = 0
    calls { _, _ in count += 1 }
    guard count > 0 else { return walk() }
    return withUnsafeTemporaryAllocation(of: Bool.self, capacity: count) { earlier in
      var index = 0
      calls { _, saved in
        earlier[index] = saved.pointee != 0
        index += 1
      }
      restoreReturnAddresses(above: stackPointer)
      defer {
        index = 0
        calls { bottom, saved in
          defer { index += 1 }
          guard index < count, !earlier[index], saved.pointee != 0 else { return }
          let call = bottom.pointee
          let slot = UnsafeMutablePointer<UInt64>(bitPattern: UInt(call.slot))!
          if slot.pointee == call.return_address { slot.pointee = saved.pointee }
          saved.pointee = 0
        }
      }
      return walk()
    }
  }

  /// After an unwind that ends in a catch in the function whose stack pointer is `stackPointer`:
  /// frames below it were unwound and are dropped (they get no exit, as for `longjmp`); frames
  /// above it (the catching function and its callers) get the graph's return address back, so
  /// their exits are still given. (A catch on an alternate signal stack drops nothing, nor is a
  /// frame on another stack dropped: the addresses of two stacks say nothing about which frames
  /// ended.)
  static func restoreAfterCatch(stackPointer: UInt64) {
    let state = ctracery_thread_state()!
    let size = UInt64(GraphEmitter.frameSize)
    let sameStack = onThreadStack(stackPointer)
    calls { bottom, saved in
      defer { saved.pointee = 0 }
      let call = bottom.pointee
      guard saved.pointee != 0, call.slot > stackPointer else { return }
      let slot = UnsafeMutablePointer<UInt64>(bitPattern: UInt(call.slot))!
      if slot.pointee == call.return_address { slot.pointee = saved.pointee }
    }
    // Unwound frames are dropped from the top down, up to the first that is live or lies on
    // another stack (a suspended coroutine's: a later return moves past it, `putRotate`).
    let unwound = unwoundHandler
    let guarded = ctracery_swap_guard(1)
    defer { _ = ctracery_swap_guard(guarded) }
    while sameStack, state.pointee.shadow_top > state.pointee.shadow_base + size {
      let frame = UnsafeMutablePointer<tracery_graph_frame>(bitPattern: UInt(state.pointee.shadow_top - size))!
      guard frame.pointee.slot <= stackPointer, onThreadStack(frame.pointee.slot) else { break }
      unwound?(frame)
      state.pointee.shadow_top -= size
    }
  }

  /// See `Tracer.unwoundHandler`.
  nonisolated(unsafe) static var unwoundHandler: UnwoundHandler?

  static let catchHookInstalled: Void = ctracery_set_catch_hook { GraphThreads.restoreAfterCatch(stackPointer: $0) }

  static var setupAddress: UInt64 { address(setupThread) }

  /// This thread's shadow depth: frames on its shadow stack now (for tests).
  static var depth: Int {
    let state = ctracery_thread_state()!.pointee
    guard state.shadow_base != 0, state.shadow_top > state.shadow_base else { return 0 }
    return Int((state.shadow_top - state.shadow_base) / UInt64(GraphEmitter.frameSize)) - 1
  }
}

extension Tracer {
  /// Adds a function-graph user on every function `selector` selects (one patch batch).
  ///
  /// - Parameters:
  ///   - cookie: handed to the handlers.
  ///   - dataWords: words of each frame reserved for this user (the kernel's
  ///     `fgraph_reserve_data`); all users share 7.
  ///   - depthLimit: calls at this shadow depth or deeper are not given to this user.
  ///   - vectorRegisters: false promises that the handlers, and all they call, use no vector
  ///     registers (C built with `-mgeneral-regs-only`, or handlers as simple as the kernel's):
  ///     while no user needs them, xmm0-7 are not saved (about 3 ns less per call).
  ///   - model: what the functions pass and return in registers (as for `attach`); the graph
  ///     saves only those registers around the handlers. Default: the model the functions already
  ///     have, or `FunctionModel.unknown` (every argument and return register).
  /// - Throws: `AttachError` when nothing matches, no user slot or data words are left, or a
  ///   second recorder is asked for.
  @discardableResult
  public func attachGraph(
    _ handlers: GraphHandlers, to selector: FunctionSelector, cookie: UInt64 = 0, dataWords: Int = 0,
    depthLimit: Int? = nil, vectorRegisters: Bool = true, model: FunctionModel? = nil
  ) throws(AttachError) -> GraphLink {
    var refused = TransactionReport()
    let targets = try resolve(selector, refused: &refused)
    let link = try makeGraphUser(
      handlers, cookie: cookie, dataWords: dataWords, depthLimit: depthLimit, vectorRegisters: vectorRegisters)
    let report = commit([.graphAttach(link.index, targets, model)])
    link.attachReport.withLock {
      $0 = refused
      $0.append(contentsOf: report)
    }
    if !hasGraphSites(of: link.index) {
      _ = commit([.graphDetach(link.index)])
      throw .nothingAttached(report)
    }
    return link
  }

  /// Takes a free user slot and its data words for a new user (attached to nothing yet).
  func makeGraphUser(
    _ handlers: GraphHandlers, cookie: UInt64, dataWords: Int, depthLimit: Int?, vectorRegisters: Bool = true
  ) throws(AttachError) -> GraphLink {
    try state.withLock { state throws(AttachError) in
      let users = state.graphUsers
      guard let index = users.firstIndex(where: { $0 == nil }) else {
        throw .graphUsersExhausted
      }
      if handlers.isRecorder, users.contains(where: { $0?.handlers.isRecorder == true }) {
        throw .graphUsersExhausted
      }
      // First fit among the words other users hold.
      var used = [Bool](repeating: false, count: GraphEmitter.dataWords)
      for case let other? in users {
        for word in other.dataOffset..<(other.dataOffset + other.dataWords) { used[word] = true }
      }
      guard (0...GraphEmitter.dataWords).contains(dataWords),
        let offset = (0...(GraphEmitter.dataWords - dataWords)).first(where: { start in
          !used[start..<(start + dataWords)].contains(true)
        })
      else { throw .graphDataExhausted(requested: dataWords) }
      state.graphUsers[index] = GraphUser(
        handlers: handlers, cookie: cookie, dataOffset: offset, dataWords: dataWords, depthLimit: depthLimit,
        vectorRegisters: vectorRegisters)
      return GraphLink(tracer: self, index: index, dataOffset: offset, dataWords: dataWords)
    }
  }

  /// Call before an unwinder walks this thread's stack (a C++ exception, a forced unwind): the
  /// unwinder cannot step through a return address the graph swapped for its stub's. Every
  /// live traced call of this thread gets its real return address back. When the unwind ends in
  /// a catch (TraceryCore interposes `__cxa_begin_catch`), the calls that survived get the
  /// graph's back and their exits are given; the others return untraced. TraceryCore's unwinder
  /// interposers call this.
  public static func restoreReturnAddresses() {
    withCallerStackMarker { GraphThreads.restoreReturnAddresses(above: $0) }
  }

  /// Runs `walk` (a backtrace: it leaves the stack as it was) with this thread's real return
  /// addresses in place, then puts the graph's back (every frame stays); during an unwind (a
  /// destructor's backtrace) the slots the unwinder restored stay as they are.
  public static func withRealReturnAddresses<T>(_ walk: () -> T) -> T {
    withCallerStackMarker { GraphThreads.withRealReturnAddresses(above: $0, walk) }
  }

  /// Whether one of this thread's traced calls returns to `address`: while the graph's return
  /// code stands in for it on the stack, the real return address is in the call's shadow frame.
  /// Allocates nothing and takes no lock (a signal handler may ask).
  public static func aTracedCallReturns(to address: UInt64) -> Bool {
    guard let state = ctracery_thread_state(), state.pointee.shadow_base != 0, state.pointee.shadow_top > 1 else {
      return false
    }
    let size = UInt64(GraphEmitter.frameSize)
    var frame = state.pointee.shadow_base + size
    while frame < state.pointee.shadow_top {
      if UnsafePointer<tracery_graph_frame>(bitPattern: UInt(frame))!.pointee.return_address == address { return true }
      frame += size
    }
    return false
  }

  /// Called, on the catching thread, for each graph frame a caught C++ exception unwound (innermost
  /// first, just before the frame is dropped), with the recursion guard held: their users' exit
  /// handlers are not (the calls did not return), but a recorder can close them here, at the time
  /// of the catch, as uftrace does. Set it before tracing starts; nil by default.
  public static var unwoundHandler: UnwoundHandler? {
    get { GraphThreads.unwoundHandler }
    set { GraphThreads.unwoundHandler = newValue }
  }

  func graphSites(of index: Int) -> [UInt64] {
    state.withLock { state in
      var sites: [UInt64] = []
      for (site, function) in state.functions where function.graphMask & (1 << index) != 0 { sites.append(site) }
      return sites.sorted()
    }
  }

  func hasGraphSites(of index: Int) -> Bool {
    state.withLock { state in state.functions.values.contains { $0.graphMask & (1 << index) != 0 } }
  }

  /// A new stub for `function` (see `GraphEmitter`), calling the image of its mask; the image is
  /// made when none within reach exists. Returns the stub's block and the image's entry.
  /// `body` is what the stub calls as the function's body: its per-function trampoline when it
  /// has one (entered as from the site), else the body itself.
  func graphStub(for function: TracedFunction, body: UInt64?, state: inout State) throws -> (
    stub: CodeImage, image: UInt64
  ) {
    let site = function.site
    let block: CodeArena.Block
    do {
      block = try arena.allocate(near: site, size: GraphEmitter.stubSize, alignment: GraphEmitter.stubSize)
    } catch {
      throw AttachError.codeMemory("\(error)")
    }
    do {
      let image = try graphImage(
        mask: function.graphMask, model: function.model, preservesAll: function.patch.shape != .nop,
        near: block.address, state: &state)
      guard
        let bytes = GraphEmitter.stub(
          at: block.address, site: site, body: body ?? function.patch.resume, entry: image.entry,
          returnHandler: image.returnHandler)
      else { throw AttachError.codeMemory("graph stub out of reach of 0x\(String(site, radix: 16))") }
      block.write(bytes)
      let stub = CodeImage(block: block, length: bytes.count)
      stub.leadsTo = [image.entry] + (body.map { [$0] } ?? [])
      return (stub, image.entry)
    } catch {
      arena.release(block)
      throw error
    }
  }

  /// The graph image for `mask` and `model` that a stub at `stub` reaches, made when there is
  /// none. `preservesAll`: for functions without a compiler's patch site (`GraphEmitter`).
  func graphImage(
    mask: UInt16, model: FunctionModel, preservesAll: Bool, near stub: UInt64, state: inout State
  ) throws -> GraphImage {
    let end = stub + UInt64(GraphEmitter.stubSize)
    if let image = state.graphImages.first(where: {
      $0.mask == mask && $0.model == model && $0.preservesAll == preservesAll
        && $0.image.block.isReachable(from: stub) && $0.image.block.isReachable(from: end)
    }) {
      return image
    }
    let users = (0..<16).compactMap { index in
      mask & (1 << index) != 0 ? state.graphUsers[index]?.code(index: index) : nil
    }
    let known = knownCode(state: state)
    let emitter = GraphEmitter(
      users: users, functionModel: model, preservesAll: preservesAll, guardOffset: guardOffset,
      threadOffset: Int32(ctracery_thread_offset()), setupThread: GraphThreads.setupAddress,
      knownCode: known.word, knownFast: known.fast)
    let (block, code) = try placeCode(
      near: stub, slack: 16 * users.count, emit: emitter.emit(at:), bytes: \.bytes)
    let image = GraphImage(
      mask: mask, model: model, preservesAll: preservesAll, returnHandler: block.address + UInt64(code.returnHandler),
      image: CodeImage(block: block, length: code.bytes.count))
    state.graphImages.append(image)
    return image
  }
}
