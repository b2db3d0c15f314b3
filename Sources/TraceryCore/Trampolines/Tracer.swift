import CTracery
import CTraceryShims
import Synchronization
import TraceryELF
import TraceryX86

#if canImport(Glibc)
  import Glibc
#endif

/// A handler written in C or Swift (`@convention(c)`), as `tracery.h` declares them.
public typealias EntryHandler = @convention(c) (UnsafeMutablePointer<tracery_call>, UInt64) -> Void
public typealias ExitHandler = @convention(c) (UnsafeMutablePointer<tracery_call>, UInt64) -> Void
/// Returns non-zero to skip the function's body; it then returns `call.pointee.return_value`.
public typealias ModifyReturnHandler = @convention(c) (UnsafeMutablePointer<tracery_call>, UInt64) -> Int32

/// A handler's kind, numbered as `tracery.h` numbers it (`tracery_handler_kind`) for C handlers,
/// fixtures and the recorder's events alike. A trampoline runs entry handlers, then
/// modify-return handlers, then the body, then exit handlers (`order`).
public enum HandlerKind: UInt8, Sendable, CaseIterable {
  case entry = 1
  case exit = 2
  case modifyReturn = 3

  /// The kinds in the order a trampoline runs them (and multi records list them).
  public static let order: [HandlerKind] = [.entry, .modifyReturn, .exit]
}

/// What to run on each call of the traced functions.
public enum Handler: Sendable {
  /// Before the body; may read and change the arguments.
  case entry(EntryHandler)
  /// After the body; reads the arguments and the return value.
  case exit(ExitHandler)
  /// Before the body, after entry handlers (the kernel's fmod_ret): may set the return value
  /// and skip the body. Runs before exit handlers.
  case modifyReturn(ModifyReturnHandler)

  public var kind: HandlerKind {
    switch self {
    case .entry: return .entry
    case .modifyReturn: return .modifyReturn
    case .exit: return .exit
    }
  }

  var address: UInt64 {
    switch self {
    case .entry(let handler): return UInt64(UInt(bitPattern: unsafeBitCast(handler, to: UnsafeRawPointer.self)))
    case .exit(let handler): return UInt64(UInt(bitPattern: unsafeBitCast(handler, to: UnsafeRawPointer.self)))
    case .modifyReturn(let handler):
      return UInt64(UInt(bitPattern: unsafeBitCast(handler, to: UnsafeRawPointer.self)))
    }
  }
}

/// Which functions to attach to.
public enum FunctionSelector: Sendable, Equatable {
  /// The function that starts at this address (its entry, or its patch site).
  case address(UInt64)
  /// Every function of the loaded objects with exactly this name.
  case name(String)
  /// Every function of the loaded objects whose name matches this glob.
  case glob(String)
  /// The functions at these addresses (entries or patch sites); unusable ones are reported.
  case addresses([UInt64])
}

/// Why an attach or detach could not be done.
public enum AttachError: Error, Equatable, CustomStringConvertible {
  case noFunctionMatches(String)
  case invalidPattern(String)
  /// The function has no patch site Tracery can use (with why: its bytes, or gcc's sled).
  case noPatchSite(function: String, reason: String)
  /// The handler kind cannot be attached under this function model.
  case unsupportedModel(function: String, reason: String)
  /// Every selected function failed; the report says why for each.
  case nothingAttached(TransactionReport)
  case codeMemory(String)
  /// 4,096 fprobes are registered.
  case fprobesExhausted
  /// All 16 function-graph user slots are taken (or a second recorder was asked for).
  case graphUsersExhausted
  /// The frame's 7 data words cannot hold another user's reservation.
  case graphDataExhausted(requested: Int)

  public var description: String {
    switch self {
    case .noFunctionMatches(let what): return "no patchable function matches \(what)"
    case .invalidPattern(let reason): return reason
    case .noPatchSite(let function, let reason): return "\(function) has no usable patch site: \(reason)"
    case .unsupportedModel(let function, let reason): return "cannot attach to \(function): \(reason)"
    case .nothingAttached(let report): return "nothing attached: \(report)"
    case .codeMemory(let reason): return reason
    case .fprobesExhausted: return "4096 fprobes are registered already"
    case .graphUsersExhausted: return "no function-graph user slot is free (16 users, one recorder)"
    case .graphDataExhausted(let requested):
      return "the function-graph frame has no room for \(requested) more data words (7 in all)"
    }
  }
}

/// What a transaction did to each function it touched.
public struct TransactionReport: Sendable, Equatable, CustomStringConvertible {
  public struct Entry: Sendable, Equatable {
    public let function: String
    public let address: UInt64
    public let outcome: PatchOutcome
  }

  /// Entries of a bulk batch as the parallel arrays it already had (sharing their storage), made
  /// into `Entry` values only when read: reporting 50,000 functions then costs nothing.
  struct Batch: Sendable, Equatable {
    let names: [String]
    let addresses: [UInt64]
    let outcomes: [PatchOutcome]
  }

  private var listed: [Entry] = []
  private var batches: [Batch] = []

  public init() {}

  public var entries: [Entry] {
    get {
      batches.isEmpty
        ? listed
        : listed
          + batches.flatMap { batch in
            batch.names.indices.map {
              Entry(function: batch.names[$0], address: batch.addresses[$0], outcome: batch.outcomes[$0])
            }
          }
    }
    set {
      listed = newValue
      batches = []
    }
  }

  mutating func append(_ entry: Entry) { listed.append(entry) }

  mutating func append(contentsOf other: TransactionReport) {
    listed += other.listed
    batches += other.batches
  }

  mutating func append(_ batch: Batch) { batches.append(batch) }

  public var failures: [Entry] { entries.filter { if case .failed = $0.outcome { true } else { false } } }

  public static func == (left: TransactionReport, right: TransactionReport) -> Bool { left.entries == right.entries }

  public var description: String {
    entries.map { "\($0.function): \($0.outcome)" }.joined(separator: "; ")
  }
}

/// One attachment of a handler to a set of functions. Keep it to keep the handler attached;
/// `detach()` removes it from every function in one batch.
public final class Link: Sendable {
  let id: Int
  let tracer: Tracer
  let counters: AttachmentCounters
  public let cookie: UInt64

  init(id: Int, tracer: Tracer, cookie: UInt64) {
    self.id = id
    self.tracer = tracer
    self.cookie = cookie
    counters = AttachmentCounters()
  }

  /// Entry addresses of the functions this link is attached to now.
  public var functions: [UInt64] { tracer.functions(of: self) }
  /// Calls that ran the handler (counted with `statistics: .calls` or `.callsAndTime`).
  public var calls: UInt64 { counters.calls }
  /// Time spent inside the handler (measured with `statistics: .callsAndTime`), from the
  /// time-stamp counter.
  public var handlerTime: Duration { .nanoseconds(Int64(Double(counters.ticks) / TimeStampCounter.ticksPerNanosecond)) }
  /// Calls on which the handler did not run because this thread was already inside a handler.
  public var skippedByRecursionGuard: UInt64 { counters.skipped }

  /// Detaches the handler from every function; the trampolines it leaves are freed once no
  /// thread is inside them. Detaching twice does nothing.
  @discardableResult
  public func detach() -> TransactionReport {
    tracer.commit([.detach(id)])
  }
}

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
    let function: UInt64
    let site: UInt64
    let name: String
    let original: [UInt8]
    var model: FunctionModel
    var attachments: [Attachment] = []
    var image: Reclaimer.Retired?
    /// Function-graph users tracing this function (bit i: user i), the stub its site jumps to
    /// now, and the entry of the graph image that stub calls.
    var graphMask: UInt16 = 0
    var graphStub: Reclaimer.Retired?
    var graphImage: UInt64?
    /// Ops on this function (ids, in attach order), and the ops image its site calls now (its
    /// single ops' own trampoline or a shared caller; nil when a per-function trampoline runs
    /// the callbacks).
    var ops: [Int] = []
    var opsEntry: UInt64?
    /// Multi attachments, and the global trampoline its site calls now (nil when they run in a
    /// per-function trampoline). `paddingOwned`: the 8 bytes before its entry hold our record
    /// pointer (or 0), not the compiler's NOPs.
    var multi: [MultiAttachment] = []
    var multiEntry: UInt64?
    var paddingOwned = false

    var isTraced: Bool { !attachments.isEmpty || graphMask != 0 || !ops.isEmpty || !multi.isEmpty }
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
    let function: UInt64
    let site: UInt64
    let name: String
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

  /// Start addresses of the live trampolines (for tests and diagnostics).
  public var liveTrampolines: [UInt64] {
    state.withLock { state in state.functions.values.compactMap { $0.image?.block.address } }
  }

  /// Whether this thread is inside a handler now (its recursion guard is set).
  public static var recursionGuardIsSet: Bool { ctracery_guard_value() != 0 }

  /// Reloads the symbol table (after `dlopen`), for name and glob selectors.
  public func reloadSymbols() { state.withLock { $0.symbols = nil } }

  // MARK: - Resolution

  func resolve(_ selector: FunctionSelector) throws(AttachError) -> [Target] {
    let (known, bulk) = state.withLock { state in
      var known: [UInt64: Target] = [:]
      for function in state.functions.values {
        let target = Target(function: function.function, site: function.site, name: function.name)
        known[function.function] = target
        known[function.site] = target
      }
      return (known, state.multi.bulk)
    }
    let context = ResolveContext(map: MemoryMap.current(), known: known, bulk: bulk)
    switch selector {
    case .address(let address):
      var hint = 0
      return [try context.target(at: address, name: nil, hint: &hint)]
    case .addresses(let addresses):
      let table = symbols
      var result: [Target] = []
      result.reserveCapacity(addresses.count)
      var previous: Int?
      var hint = 0
      let plain = context.known.isEmpty && context.bulk.isEmpty
      for address in addresses {
        previous = table.function(containing: address, after: previous)
        let name = previous.map { table.functions[$0].name }
        // The common case inline (this loop runs per function of a 50,000-function attach): an
        // untraced function whose entry is a 5-byte NOP.
        if plain, let name, context.map.isExecutable(address, count: 9, hint: &hint),
          SiteBytes(reading: address).isNop5
        {
          result.append(Target(function: address, site: address, name: name))
        } else if let target = try? context.target(at: address, name: name, hint: &hint) {
          result.append(target)
        }
      }
      guard !result.isEmpty else { throw .noFunctionMatches("any of \(addresses.count) addresses") }
      return result
    case .name(let name):
      return try targets(matching: name, context) { table in table.functions(named: name) }
    case .glob(let pattern):
      let glob: Glob
      do { glob = try Glob(pattern) } catch { throw .invalidPattern("\(error)") }
      return try targets(matching: "'\(pattern)'", context) { table in table.functions(matching: glob) }
    }
  }

  private func targets(
    matching what: String, _ context: ResolveContext, _ select: (SymbolTable) -> [Int]
  ) throws(AttachError) -> [Target] {
    let table = symbols
    let chosen = select(table).filter { table.functions[$0].site != nil }
    guard !chosen.isEmpty else { throw .noFunctionMatches(what) }
    var result: [Target] = []
    result.reserveCapacity(chosen.count)
    var hint = 0
    for index in chosen {
      let function = table.functions[index]
      result.append(try context.target(at: function.site!, name: function.name, entry: function.address, hint: &hint))
    }
    return result
  }

  /// Builds the symbol table from the loaded objects `include` accepts only (e.g. those that
  /// record patch sites: `ELFFile.recordsPatchSites`), instead of every loaded object. A process
  /// that traces only patchable code need not read the C library or the Swift runtime (each
  /// agent start read ~20 MB of objects that have no sites). Functions of the objects left out
  /// are then unknown by name.
  public func loadSymbols(including include: (ProcessObjects.Entry) -> Bool) {
    let table = ProcessObjects.symbolTable(including: include).table
    state.withLock { $0.symbols = table }
  }

  /// The symbol table of the loaded objects: built on first use and kept (`reloadSymbols()`
  /// after `dlopen`).
  public var symbols: SymbolTable {
    state.withLock { state in
      if state.symbols == nil { state.symbols = ProcessObjects.symbolTable().table }
      return state.symbols!
    }
  }

  /// What resolving one selector reads once: the memory map and the functions already traced.
  struct ResolveContext {
    let map: MemoryMap
    let known: [UInt64: Target]
    let bulk: [BulkLink]

    /// The site of the function at `address`: `address` itself when a 5-byte NOP is there, or
    /// 4 bytes on when it starts with `endbr64`.
    /// `hint`: see `MemoryMap.isExecutable(_:count:hint:)`.
    func target(at address: UInt64, name: String?, entry: UInt64? = nil, hint: inout Int) throws(AttachError)
      -> Target
    {
      if !known.isEmpty, let known = known[address] { return known }
      for link in bulk {
        // A bulk function's site is its entry, or 4 bytes on (after endbr64).
        if let index = link.index(of: address) ?? link.index(of: address + 4),
          link.functions[index] == address
            || link.sites[index] == address
        {
          return Target(function: link.functions[index], site: link.sites[index], name: link.names[index])
        }
      }
      let label = name ?? "0x\(String(address, radix: 16))"
      guard map.isExecutable(address, count: 9, hint: &hint) else {
        throw .noPatchSite(function: label, reason: "not in readable executable memory")
      }
      // The common case first, without building byte arrays: a 5-byte NOP at the address.
      if SiteBytes(reading: address).isNop5 { return Target(function: entry ?? address, site: address, name: label) }
      var site = address
      if SiteBytes(reading: address).bytes.prefix(4) == X86Instruction.endbr64[...] { site += 4 }
      switch X86Instruction.SiteShape(bytes: TextPatcher.read(site), at: site) {
      case .nop5:
        return Target(function: entry ?? address, site: site, name: label)
      case .nopSled:
        throw .noPatchSite(
          function: label,
          reason: "gcc's 5×1-byte NOP sled; convert it first (TextPatcher.convertSleds, one thread only)")
      case let shape:
        throw .noPatchSite(function: label, reason: "its entry holds \(shape), not a 5-byte NOP")
      }
    }
  }

  func functions(of link: Link) -> [UInt64] {
    state.withLock { state in
      state.functions.values.filter { $0.attachments.contains { $0.link.id == link.id } }.map(\.function).sorted()
    }
  }

  // MARK: - Commit

  /// Applies `operations` in one patch batch (see the type's comment) and reports per function.
  func commit(_ operations: [Operation]) -> TransactionReport {
    withCallerStackMarker { top in commit(operations, callerStack: top) }
  }

  @inline(never)
  private func commit(_ operations: [Operation], callerStack: UInt64) -> TransactionReport {
    state.withLock { state in
      var report = TransactionReport()
      // Functions of bulk links that anything attaches to become general functions first.
      if !state.multi.bulk.isEmpty {
        var touched: [UInt64] = []
        for operation in operations {
          switch operation {
          case .attach(_, let targets, _), .graphAttach(_, let targets, _), .opsAttach(_, let targets),
            .multiAttach(_, let targets):
            touched += targets.map(\.site)
          default: break
          }
        }
        migrateFromBulk(touched, state: &state)
      }
      // 1. The new attachment lists (and graph masks) of every touched function.
      var next: [UInt64: TracedFunction] = [:]
      var graphUsersChanged = false
      var opsChanged = false
      var multiChanged = false
      var removedOps: [OpsRecord] = []
      func current(_ target: Target) -> TracedFunction {
        if let function = next[target.site] ?? state.functions[target.site] { return function }
        var function = TracedFunction(
          function: target.function, site: target.site, name: target.name, original: TextPatcher.read(target.site),
          model: .unknown)
        // Padding zeroed after an earlier use (by any tracer) is ours again (`ZeroedPadding`).
        if ZeroedPadding.claim(before: target.site) {
          function.paddingOwned = true
          state.multi.pendingNops.remove(target.site - 8)
        }
        return function
      }
      func remove(_ matches: (TracedFunction) -> Bool, _ change: (inout TracedFunction) -> Void) {
        for site in Set(next.keys).union(state.functions.keys) {
          guard var function = next[site] ?? state.functions[site], matches(function) else { continue }
          change(&function)
          next[site] = function
        }
      }
      for operation in operations {
        switch operation {
        case .attach(let attachment, let targets, let model):
          for target in targets {
            var function = current(target)
            if let model { function.model = model }
            function.attachments.append(attachment)
            next[target.site] = function
          }
        case .detach(let id):
          remove({ $0.attachments.contains { $0.link.id == id } }) { $0.attachments.removeAll { $0.link.id == id } }
        case .graphAttach(let index, let targets, let model):
          graphUsersChanged = true
          for target in targets {
            var function = current(target)
            if let model { function.model = model }
            function.graphMask |= 1 << index
            next[target.site] = function
          }
        case .graphDetach(let index):
          guard state.graphUsers[index] != nil else { continue }
          graphUsersChanged = true
          state.graphUsers[index] = nil
          // Calls in flight keep their frames but are no longer given to this user's exit.
          GraphThreads.advanceGeneration(index)
          remove({ $0.graphMask & (1 << index) != 0 }) { $0.graphMask &= ~(1 << index) }
        case .graphRemoveSites(let index, let sites):
          graphUsersChanged = true
          let leaving = Set(sites)
          remove({ leaving.contains($0.site) && $0.graphMask & (1 << index) != 0 }) { $0.graphMask &= ~(1 << index) }
        case .opsAttach(let record, let targets):
          opsChanged = true
          state.ops[record.id] = record
          for target in targets {
            var function = current(target)
            function.ops.append(record.id)
            record.sites.insert(target.site)
            next[target.site] = function
          }
        case .multiAttach(let attachments, let targets):
          multiChanged = true
          for (attachment, target) in zip(attachments, targets) {
            var function = current(target)
            function.multi.append(attachment)
            next[target.site] = function
          }
        case .multiDetach(let id):
          multiChanged = true
          _ = detachBulk(id, state: &state, report: &report, callerStack: callerStack)
          remove({ $0.multi.contains { $0.link == id } }) { $0.multi.removeAll { $0.link == id } }
        case .opsDetach(let id):
          guard let record = state.ops.removeValue(forKey: id) else { continue }
          opsChanged = true
          removedOps.append(record)
          remove({ $0.ops.contains(id) }) { $0.ops.removeAll { $0 == id } }
        }
      }
      // Ops added or gone: the shared callers' tables change, so every shared site moves.
      var retiredSharedImages: [OpsSharedImage] = []
      if opsChanged {
        retiredSharedImages = state.opsSharedImages
        state.opsSharedImages = []
        for (site, function) in state.functions where function.opsEntry != nil && next[site] == nil {
          next[site] = function
        }
      }
      // New users or users gone: every graph image is remade, so every graph site moves.
      var retiredGraphImages: [GraphImage] = []
      if graphUsersChanged {
        retiredGraphImages = state.graphImages
        state.graphImages = []
        for (site, function) in state.functions where function.graphMask != 0 && next[site] == nil {
          next[site] = function
        }
      }
      // 2. A new trampoline (or graph entry) for each, or the original bytes.
      var requests: [PatchRequest] = []
      var planned: [(site: UInt64, function: TracedFunction)] = []
      for site in next.keys.sorted() {
        var function = next[site]!
        let old = state.functions[site]
        let oldBytes =
          old?.graphStub.map { X86Instruction.jmp(at: site, to: $0.block.address)! }
          ?? old?.image.map { X86Instruction.jmp(at: site, to: $0.block.address)! }
          ?? old?.opsEntry.map { X86Instruction.call(at: site, to: $0)! }
          ?? old?.multiEntry.map { X86Instruction.call(at: site, to: $0)! } ?? function.original
        function.image = nil
        function.graphStub = nil
        function.graphImage = nil
        function.opsEntry = nil
        function.multiEntry = nil
        do {
          // A per-function trampoline runs direct handlers, and ops and multi handlers whenever the
          // function has anything else too; with graph users, the graph stub calls it as the
          // function's body.
          let ownTrampoline =
            !function.attachments.isEmpty || (!function.multi.isEmpty && function.multiNeedsOwnTrampoline)
            || (function.graphMask != 0 && !function.ops.isEmpty)
          if ownTrampoline {
            function.image = try makeImage(for: function, ops: function.ops.compactMap { state.ops[$0] })
          }
          if function.graphMask != 0 {
            (function.graphStub, function.graphImage) = try graphStub(
              for: function, body: function.image?.block.address, state: &state)
          } else if !ownTrampoline && !function.ops.isEmpty {
            function.opsEntry = try opsEntry(for: function, state: &state)
          } else if !ownTrampoline && !function.multi.isEmpty {
            function.multiEntry = try multiTrampoline(for: function, state: &state)
          }
        } catch {
          report.append(
            .init(function: function.name, address: function.function, outcome: .failed("\(error)")))
          continue
        }
        let newBytes =
          function.graphStub.map { X86Instruction.jmp(at: site, to: $0.block.address)! }
          ?? function.image.map { X86Instruction.jmp(at: site, to: $0.block.address)! }
          ?? function.opsEntry.map { X86Instruction.call(at: site, to: $0)! }
          ?? function.multiEntry.map { X86Instruction.call(at: site, to: $0)! } ?? function.original
        requests.append(PatchRequest(site: site, expected: oldBytes, replacement: newBytes))
        planned.append((site, function))
      }
      // Multi records first: a site must find its record before it calls a global trampoline.
      // (Whether a function uses its padding is decided while its NOPs are still there.)
      for index in planned.indices
      where planned[index].function.multiEntry != nil && planned[index].function.usesPadding {
        planned[index].function.paddingOwned = true
      }
      var multiFailed: Set<UInt64> = []
      // Any function moving into or out of a global trampoline changes the records too.
      if multiChanged
        || planned.contains(where: { $0.function.multiEntry != nil || state.functions[$0.site]?.multiEntry != nil })
      {
        var global = state.functions.filter { next[$0.key] == nil && $0.value.multiEntry != nil }.map(\.value)
        global += planned.map(\.function).filter { $0.multiEntry != nil }
        do {
          multiFailed = try publishMultiTable(global.sorted { $0.site < $1.site }, state: &state)
        } catch {
          multiFailed = Set(planned.filter { $0.function.multiEntry != nil }.map(\.site))
        }
      }
      for index in planned.indices.reversed() where multiFailed.contains(planned[index].site) {
        report.append(
          .init(
            function: planned[index].function.name, address: planned[index].function.function,
            outcome: .failed("cannot write its record pointer into its padding")))
        planned.remove(at: index)
        requests.remove(at: index)
      }
      // 3. One batch for every site.
      let outcomes = patcher.apply(requests)
      // 4. Keep what was patched; undo what was not. The new live trampolines share one unwind
      //    table (one registration for the whole commit).
      var live: [(site: UInt64, function: TracedFunction)] = []
      var failed: [CodeArena.Block] = []
      for ((site, function), outcome) in zip(planned, outcomes) {
        report.append(.init(function: function.name, address: function.function, outcome: outcome))
        if case .failed = outcome {
          failed += [function.image, function.graphStub].compactMap { $0?.block }
          continue
        }
        if let old = state.functions[site]?.image { state.reclaimer.retire(old) }
        if let old = state.functions[site]?.graphStub { state.reclaimer.retire(old) }
        live.append((site, function))
      }
      arena.release(contentsOf: failed)
      let images = live.compactMap(\.function.image)
      let table =
        UnwindInfo.isAvailable && !images.isEmpty
        ? UnwindInfo(images.map { .init(block: $0.block, length: $0.length, frame: $0.frame!) }, arena: arena) : nil
      // Padding that no longer holds a live record pointer: 0 (a trampoline reading it then
      // finds no record). A function leaving for good gets its NOPs back once no thread is inside
      // a global trampoline (one may have called it just before its site changed).
      var cleared: [(address: UInt64, value: UInt64)] = []
      for (site, var function) in live {
        function.image?.unwind = table
        if function.paddingOwned && (function.multiEntry == nil || !function.usesPadding) {
          cleared.append((site - 8, 0))
          if !function.isTraced { state.multi.pendingNops.insert(site - 8) }
          function.paddingOwned = function.isTraced
        }
        state.functions[site] = function.isTraced ? function : nil
      }
      _ = patcher.writeWords(cleared)
      ZeroedPadding.add(cleared.map(\.address))
      restorePaddingNops(state: &state, callerStack: callerStack)
      // Old graph images and shared ops callers are retired once no site calls them (a site that
      // failed to move keeps its image, and the image stays listed). A listed image no function
      // uses any more (its functions moved to another model, or failed to move to it) goes too.
      let calledGraph = Set(state.functions.values.compactMap(\.graphImage))
      retiredGraphImages += state.graphImages.filter { !calledGraph.contains($0.entry) }
      state.graphImages.removeAll { !calledGraph.contains($0.entry) }
      state.graphImages += state.reclaimer.retire(
        retiredGraphImages, unlessCalled: calledGraph, entry: \.entry, image: \.image)
      let calledByOps = Set(state.functions.values.compactMap(\.opsEntry))
      state.opsSharedImages += state.reclaimer.retire(
        retiredSharedImages, unlessCalled: calledByOps, entry: \.entry, image: \.image)
      // The own trampolines of ops that left.
      for record in removedOps {
        for image in record.ownImages where !calledByOps.contains(image.block.address) {
          state.reclaimer.retire(image)
        }
      }
      if state.reclaimer.isDue(now: .now) { _ = state.reclaimer.reclaim(arena: arena, callerStack: callerStack) }
      return report
    }
  }

  /// The per-function trampoline of `function`; its ops' callbacks run first, as entry handlers,
  /// and its multi handlers after its own of each kind.
  private func makeImage(for function: TracedFunction, ops: [OpsRecord]) throws -> Reclaimer.Retired {
    let model =
      function.model.stackArgumentWords == nil && !function.multi.isEmpty ? function.multiClass : function.model
    let exits = function.attachments.filter { $0.handler.kind == .exit }
    let modifies = function.attachments.filter { $0.handler.kind == .modifyReturn }
    if !exits.isEmpty || !modifies.isEmpty, model.stackArgumentWords == nil {
      throw AttachError.unsupportedModel(
        function: function.name,
        reason: "exit and modify-return handlers call the original, which needs its stack arguments; "
          + "pass a FunctionModel with stackArgumentWords")
    }
    func calls(_ kind: HandlerKind) -> [HandlerCall] {
      function.attachments.filter { $0.handler.kind == kind }.map {
        HandlerCall(
          handler: $0.handler.address, cookie: $0.link.cookie, counters: $0.link.counters.address,
          statistics: $0.statistics)
      } + function.multi.filter { $0.kind == kind }.map(\.handlerCall)
    }
    let emitter = TrampolineEmitter(
      function: function.function, site: function.site, model: model, entries: ops.map(\.handlerCall) + calls(.entry),
      modifyReturns: calls(.modifyReturn), exits: calls(.exit), guardOffset: guardOffset)
    // Emit once at a provisional address for the size, then for real where it will run. A
    // handler call is 8 bytes longer where the handler is out of rel32 reach: leave room.
    let size =
      try emitter.emit(at: function.site).bytes.count + 8
      * (function.attachments.count + ops.count + function.multi.count)
    let block: CodeArena.Block
    do { block = try arena.allocate(near: function.site, size: size, alignment: CodeArena.hotCodeAlignment) } catch {
      throw AttachError.codeMemory("\(error)")
    }
    do {
      let code = try emitter.emit(at: block.address)
      block.write(code.bytes)
      return Reclaimer.Retired(
        block: block, length: code.bytes.count, frame: code.frame, unwind: nil,
        counters: function.attachments.map(\.link.counters) + ops.map(\.counters))
    } catch {
      arena.release(block)
      throw error
    }
  }
}

/// The time-stamp counter's rate, measured once against the monotonic clock (10 ms).
public enum TimeStampCounter {
  /// The counter now.
  public static var now: UInt64 { ctracery_rdtsc() }

  /// The counter's rate: from `environmentKey` when set (`tracery record` measures it once
  /// for every process it starts: measuring takes 10 ms), else measured now.
  /// The environment variable that carries a measured rate to the processes a tool starts.
  public static let environmentKey = "TRACERY_TICKS_PER_NS"

  public static let ticksPerNanosecond: Double = {
    if let text = getenv(environmentKey).map({ String(cString: $0) }), let rate = Double(text), rate > 0 {
      return rate
    }
    let clock = ContinuousClock()
    let start = clock.now
    let startTicks = ctracery_rdtsc()
    while clock.now - start < .milliseconds(10) {}
    let ticks = Double(ctracery_rdtsc() - startTicks)
    let elapsed = clock.now - start
    let nanoseconds = Double(elapsed.components.seconds) * 1e9 + Double(elapsed.components.attoseconds) / 1e9
    return max(ticks / nanoseconds, 1e-3)
  }()
}
