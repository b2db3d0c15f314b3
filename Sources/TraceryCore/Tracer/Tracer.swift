import CTracery
import CTraceryShims
import Synchronization
import TraceryELF
import TraceryX86

#if canImport(Glibc)
  import Glibc
#endif

/// The front door: attaches handlers to functions through per-function trampolines (the
/// kernel's BPF trampoline) and keeps every site, trampoline and attachment consistent.
///
/// All changes go through `commit`, under one lock: a change builds the new trampoline of each
/// touched function, rewrites all their sites in one `TextPatcher` batch (one text update for N
/// functions, as the kernel's ftrace updates its records in one batch), and retires the images it replaced to the `Reclaimer`.
public final class Tracer: Sendable {
  public static let shared = Tracer()

  let arena: CodeArena
  let patcher: TextPatcher
  let state = Mutex(State())
  private let nextID = Atomic<Int>(1)
  func nextLinkID() -> Int { nextID.wrappingAdd(1, ordering: .relaxed).oldValue }
  let guardOffset = Int32(ctracery_guard_offset())
  let fprobes = Mutex(FprobeRegistry())

  struct Attachment {
    let link: Link
    let handler: Handler
    let statistics: Statistics
  }

  struct TracedFunction {
    /// Its site; a relocated one gets its copy's address when the function is first planned.
    var patch: PatchSite
    /// The out-of-line copy of its first instructions (`PatchSite.Shape.relocated`).
    var relocatedCopy: CodeImage?
    let name: String
    /// The 5 bytes at its site before anything traced it.
    let original: SiteBytes
    var model: FunctionModel
    /// Function-graph users tracing this function (bit i: user i), the stub its site jumps to
    /// now, and the entry of the graph image that stub calls.
    var graphMask: UInt16 = 0
    var graphStub: CodeImage?
    var graphImage: UInt64?
    /// Everything else, out of line: nil while it all has its default, as for a function only
    /// the graph traces (a commit copies each touched function several times; 50,000 of them
    /// made the copies' reference counting most of a `record -p` attach).
    private var more: More?

    init(patch: PatchSite, name: String, original: SiteBytes, model: FunctionModel) {
      self.patch = patch
      self.name = name
      self.original = original
      self.model = model
    }

    /// The fields kept out of line (copied on write: `TracedFunction` stays a value).
    final class More {
      var attachments: [Attachment] = []
      var image: CodeImage?
      var ops: [Int] = []
      var opsEntry: UInt64?
      var multi: [MultiAttachment] = []
      var multiEntry: UInt64?
      var paddingOwned = false
      var multiStub: UInt64?
      var multiStubImage: CodeImage?

      /// Per-function, ops or multi-attach handlers.
      var hasHandlers: Bool { !attachments.isEmpty || !ops.isEmpty || !multi.isEmpty }

      func copy() -> More {
        let copy = More()
        copy.attachments = attachments
        copy.image = image
        copy.ops = ops
        copy.opsEntry = opsEntry
        copy.multi = multi
        copy.multiEntry = multiEntry
        copy.paddingOwned = paddingOwned
        copy.multiStub = multiStub
        copy.multiStubImage = multiStubImage
        return copy
      }
    }

    /// Sets a field of `more` (made, or copied when shared); a default value where there is no
    /// `more` changes nothing.
    private mutating func set<Value>(
      _ field: ReferenceWritableKeyPath<More, Value>, _ value: Value, isDefault: Bool
    ) {
      if more == nil {
        if isDefault { return }
        more = More()
      } else if !isKnownUniquelyReferenced(&more!) {
        more = more!.copy()
      }
      more![keyPath: field] = value
    }

    /// Handlers with a per-function trampoline.
    var attachments: [Attachment] {
      get { more?.attachments ?? [] }
      set { set(\.attachments, newValue, isDefault: newValue.isEmpty) }
    }
    var image: CodeImage? {
      get { more?.image }
      set { set(\.image, newValue, isDefault: newValue == nil) }
    }
    /// Ops on this function (ids, in attach order), and the ops image its site calls now (its
    /// single ops' own trampoline or a shared caller; nil when a per-function trampoline runs
    /// the callbacks).
    var ops: [Int] {
      get { more?.ops ?? [] }
      set { set(\.ops, newValue, isDefault: newValue.isEmpty) }
    }
    var opsEntry: UInt64? {
      get { more?.opsEntry }
      set { set(\.opsEntry, newValue, isDefault: newValue == nil) }
    }
    /// Multi attachments, and the global trampoline its site calls now (nil when they run in a
    /// per-function trampoline). `paddingOwned`: the 8 bytes before its entry hold our record
    /// pointer (or 0), not the compiler's NOPs.
    var multi: [MultiAttachment] {
      get { more?.multi ?? [] }
      set { set(\.multi, newValue, isDefault: newValue.isEmpty) }
    }
    var multiEntry: UInt64? {
      get { more?.multiEntry }
      set { set(\.multiEntry, newValue, isDefault: newValue == nil) }
    }
    var paddingOwned: Bool {
      get { more?.paddingOwned ?? false }
      set { set(\.paddingOwned, newValue, isDefault: !newValue) }
    }
    /// The `MultiStub` its site jumps to (with exit or modify-return multi handlers on a global
    /// trampoline), and its block when the stub is its own (nil: in a bulk link's stub block).
    var multiStub: UInt64? {
      get { more?.multiStub }
      set { set(\.multiStub, newValue, isDefault: newValue == nil) }
    }
    var multiStubImage: CodeImage? {
      get { more?.multiStubImage }
      set { set(\.multiStubImage, newValue, isDefault: newValue == nil) }
    }

    var isTraced: Bool { graphMask != 0 || more?.hasHandlers == true }
    /// Whether anything but the function graph traces it, or owns its padding.
    var hasOtherHandlers: Bool { more.map { $0.hasHandlers || $0.paddingOwned } ?? false }
    var function: UInt64 { patch.function }
    /// Its patch site's address: the key of `State.functions`.
    var site: UInt64 { patch.address }
  }

  struct State: ~Copyable {
    var functions: [UInt64: TracedFunction] = [:]
    var reclaimer = Reclaimer()
    var symbols: SymbolTable?
    var graphUsers: [GraphUser?] = Array(repeating: nil, count: 16)
    /// Graph images for the current users, one per mask (and per ±2 GiB region).
    var graphImages: [GraphImage] = []
    var ops: [Int: OpsRecord] = [:]
    /// Shared callers for the current ops, one per ±2 GiB region.
    var opsSharedImages: [OpsSharedImage] = []
    var multi = MultiState()
    var relocatesPrologues = false
    var usesTrapSites = true
    var trapSiteObjects: Set<String>?
    /// Set when graph calls are traced only from known code (`KnownCode`).
    var knownCode: KnownCode?
  }

  enum Operation {
    case attach(Attachment, [Target], FunctionModel?)
    case detach(Int)
    case graphAttach(Int, [Target], FunctionModel?)
    case graphDetach(Int)
    case graphRemoveSites(Int, [UInt64])
    case opsAttach(OpsRecord, [Target])
    case opsDetach(Int)
    case multiAttach([MultiAttachment], [Target])
    case multiDetach(Int)
  }

  /// A resolved function: entry address, site, name.
  struct Target: Equatable {
    let patch: PatchSite
    let name: String
    var function: UInt64 { patch.function }
    var site: UInt64 { patch.address }
  }

  init(arena: CodeArena = .shared, patcher: TextPatcher = .shared) {
    self.arena = arena
    self.patcher = patcher
  }

  // MARK: - Public API

  /// Attaches `handler` to every function `selector` selects, in one batch.
  ///
  /// - Parameters:
  ///   - cookie: handed to the handler on every call.
  ///   - model: what the functions' trampolines must preserve; default: all that the existing
  ///     attachments use, or `FunctionModel.unknown`. Exit and modify-return handlers need the
  ///     stack argument count.
  ///   - statistics: what to count (`Link.calls`, `Link.handlerTime`); `.none` costs nothing.
  /// - Throws: `AttachError` when nothing matches, a function has no usable site, or every
  ///   function failed. Partial failures are in `Link`'s functions and the returned report.
  @discardableResult
  public func attach(
    _ handler: Handler, to selector: FunctionSelector, cookie: UInt64 = 0, model: FunctionModel? = nil,
    statistics: Statistics = .none
  ) throws(AttachError) -> Link {
    var transaction = Transaction(tracer: self)
    let link = try transaction.attach(handler, to: selector, cookie: cookie, model: model, statistics: statistics)
    let report = transaction.commit()
    if link.functions.isEmpty { throw .nothingAttached(report) }
    return link
  }

  /// Collects attaches and detaches and applies them in one patch batch.
  public func transaction(_ body: (inout Transaction) throws(AttachError) -> Void) throws(AttachError)
    -> TransactionReport
  {
    var transaction = Transaction(tracer: self)
    try body(&transaction)
    return transaction.commit()
  }

  /// A batch of changes, applied by `commit()` (or at the end of `Tracer.transaction`).
  public struct Transaction {
    let tracer: Tracer
    var operations: [Operation] = []

    /// Queues an attach; the returned link is live once the transaction commits.
    public mutating func attach(
      _ handler: Handler, to selector: FunctionSelector, cookie: UInt64 = 0, model: FunctionModel? = nil,
      statistics: Statistics = .none
    ) throws(AttachError) -> Link {
      let targets = try tracer.resolve(selector)
      let link = Link(id: tracer.nextLinkID(), tracer: tracer, cookie: cookie)
      operations.append(.attach(Attachment(link: link, handler: handler, statistics: statistics), targets, model))
      return link
    }

    public mutating func detach(_ link: Link) { operations.append(.detach(link.id)) }

    /// Queues an ops attach (see `Tracer.attachOps`); the link is live once the transaction
    /// commits.
    public mutating func attachOps(
      _ callback: OpsCallback, to filter: FunctionSelector, except notrace: FunctionSelector? = nil,
      cookie: UInt64 = 0, flags: OpsFlags = []
    ) throws(AttachError) -> OpsLink {
      var targets = try tracer.resolve(filter)
      if let notrace {
        let excluded = Set(try tracer.resolve(notrace).map(\.site))
        targets.removeAll { excluded.contains($0.site) }
        guard !targets.isEmpty else { throw .noFunctionMatches("any function outside the notrace set") }
      }
      let id = tracer.nextLinkID()
      let record = OpsRecord(
        id: id, callback: UInt64(UInt(bitPattern: unsafeBitCast(callback, to: UnsafeRawPointer.self))),
        cookie: cookie, flags: flags)
      operations.append(.opsAttach(record, targets))
      return OpsLink(tracer: tracer, id: id)
    }

    public mutating func detach(_ ops: OpsLink) { operations.append(.opsDetach(ops.id)) }

    @discardableResult
    public mutating func commit() -> TransactionReport {
      defer { operations = [] }
      return tracer.commit(operations)
    }
  }

  /// Frees every retired trampoline no thread is inside any more; returns how many. Also puts
  /// back the NOPs of multi-attach padding that waited for no thread to be inside a global
  /// trampoline.
  @discardableResult
  public func reclaim() -> Int {
    withCallerStackMarker { top in
      state.withLock { state in
        restorePaddingNops(state: &state, callerStack: top)
        return state.reclaimer.reclaim(arena: arena, callerStack: top)
      }
    }
  }

  /// Why the last reclaim pass could not inspect every thread (nil when it could).
  public var reclaimObstacle: String? { state.withLock { $0.reclaimer.lastObstacle } }

  /// Trampolines replaced or detached but not yet freed.
  public var retiredTrampolines: Int { state.withLock { $0.reclaimer.retired.count } }

  /// Whether a function without a NOP at its entry may be traced by moving its first
  /// instructions out of line (`PatchSite.Shape.relocated`; with other threads running, those
  /// stopped inside the moved bytes are moved to the copy), or, when they cannot be moved or a
  /// thread that cannot be inspected runs, through an int3 on its first instruction
  /// (`PatchSite.Shape.trap`: a signal a call). Off by default: such functions are then refused.
  ///
  /// Code built without patch sites may have been compiled with gcc's `-fipa-ra` (on at -O2),
  /// whose callers keep values in call-clobbered registers the callee does not touch, and with
  /// `-fipa-stack-alignment`, whose callers may call it with rsp not 16-byte aligned. Every kind
  /// of handler on such a function runs in code that aligns the stack and keeps every
  /// call-clobbered register (`PatchSite.keepsEveryRegister`): the function graph's images
  /// (`GraphEmitter.preservesAll`) and per-function trampolines, which also run its ops and
  /// multi-attach handlers (never the shared callers or global trampolines there).
  public var relocatesPrologues: Bool {
    get { state.withLock { $0.relocatesPrologues } }
    set { state.withLock { $0.relocatesPrologues = newValue } }
  }

  /// Whether a function that cannot be relocated (or whose relocation had to be abandoned) is
  /// traced through an int3 when `relocatesPrologues` is on (the default), or refused. Turn it off
  /// where a thread may block SIGTRAP: the kernel kills a thread that traps with it blocked (the
  /// agent keeps it deliverable only in a program it was preloaded into).
  public var usesTrapSites: Bool {
    get { state.withLock { $0.usesTrapSites } }
    set { state.withLock { $0.usesTrapSites = newValue } }
  }

  /// When set, only functions of these objects (paths, as `ProcessObjects` lists them) may get
  /// an int3 site; another object's function that cannot be relocated is refused. For code the
  /// tracer's own machinery may run: the SIGTRAP handler reaching an int3 site of a function it
  /// calls (libc's `syscall`, say) would trap with SIGTRAP blocked, and the kernel kills such a
  /// thread.
  public var trapSiteObjects: Set<String>? {
    get { state.withLock { $0.trapSiteObjects } }
    set { state.withLock { $0.trapSiteObjects = newValue } }
  }

  /// How many traced functions have a site of each shape.
  public var siteShapes: [PatchSite.Shape: Int] {
    state.withLock { state in
      // (Through the index, in place: copying 50,000 functions' states took milliseconds; and
      // counted by raw value: a dictionary update per function took ~5 ms of them.)
      var counts = [Int](repeating: 0, count: 256)
      for index in state.functions.indices { counts[Int(state.functions.values[index].patch.shape.rawValue)] += 1 }
      var shapes: [PatchSite.Shape: Int] = [:]
      for (raw, count) in counts.enumerated() where count > 0 {
        if let shape = PatchSite.Shape(rawValue: UInt8(raw)) { shapes[shape] = count }
      }
      return shapes
    }
  }

  /// Start addresses of the live trampolines (for tests and diagnostics).
  public var liveTrampolines: [UInt64] {
    state.withLock { state in state.functions.values.compactMap { $0.image?.block.address } }
  }

  /// Whether this thread is inside a handler now (its recursion guard is set).
  public static var recursionGuardIsSet: Bool { ctracery_guard_value() != 0 }

  /// Runs `body` (attaches, library calls) reading the process's mappings once for all of it
  /// instead of at each batch (~60 µs a read in a small traced process). Only where no other
  /// thread changes the program's mappings meanwhile: the agent's start, before `main`.
  public static func withMappingsFixed<T>(_ body: () throws -> T) rethrows -> T { try MemoryMap.fixed(body) }

  /// Reloads the symbol table (after `dlopen`), for name and glob selectors.
  public func reloadSymbols() { state.withLock { $0.symbols = nil } }
}
