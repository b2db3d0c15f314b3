import CTraceryShims
import Synchronization
import TraceryX86

/// How the functions of a multi attachment are traced.
public enum MultiStrategy: Sendable, Equatable {
  /// Per-function trampolines for up to `MultiStrategy.perFunctionLimit` functions (fastest per
  /// call, ~300 bytes of code each), the global trampolines beyond (one record of 32 + 16 bytes
  /// per handler per function, no code per function).
  case automatic
  /// Each function's own trampoline runs the handler (as `Tracer.attach` would).
  case perFunction
  /// The global trampoline of the function's argument class finds the function's record by its
  /// address: in the 8 bytes of NOP padding before its entry (`-fpatchable-function-entry=13,8`)
  /// or in a hash table. `.automatic` takes the padding where every target has it.
  case global(MultiLookup)

  public static let perFunctionLimit = 16
}

public enum MultiLookup: Sendable, Equatable { case automatic, hash, padding }

/// One handler attached to many functions (the kernel's tracing multi-link). Keep it to keep the
/// handler attached; `detach()` removes it from every function in one batch.
public final class MultiLink: Sendable {
  let tracer: Tracer
  let id: Int

  init(tracer: Tracer, id: Int) {
    self.tracer = tracer
    self.id = id
  }

  /// The patch sites this link is attached to now.
  public var sites: [UInt64] { tracer.multiSites(of: id) }

  @discardableResult
  public func detach() -> TransactionReport { tracer.commit([.multiDetach(id)]) }
}

/// One multi handler on one function.
struct MultiAttachment {
  let link: Int
  let kind: HandlerKind
  let handler: UInt64
  let cookie: UInt64
  /// The argument class: what the global trampoline saves.
  let model: FunctionModel
  let strategy: MultiStrategy

  /// In a per-function trampoline. Multi attachments keep no statistics: they share one set of
  /// counters (the trampoline counts guard skips there).
  var handlerCall: HandlerCall {
    HandlerCall(handler: handler, cookie: cookie, counters: Self.counters.address, statistics: .none)
  }
  static let counters = AttachmentCounters()
}

/// What the tracer keeps for the multi links: the current record table and the global
/// trampolines. `tableWord` is read by hash-mode trampolines (see `MultiEmitter`).
struct MultiState {
  let tableWord: UnsafeMutablePointer<UInt64> = {
    let word = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    word.initialize(to: 0)
    return word
  }()
  var table: CodeImage?
  var trampolines: [(key: MultiKey, image: CodeImage)] = []
  /// Links kept as arrays (`BulkLink`).
  var bulk: [BulkLink] = []
  /// Padding words this tracer set to 0 when their function left, that get their NOPs back once
  /// no thread can be inside a global trampoline (one that had called it might still read them).
  /// Each is also in `ZeroedPadding` until someone claims it.
  var pendingNops: Set<UInt64> = []
  /// Records of hash-mode bulk links detached since the last publish: a reader holding the
  /// current table may still reach them, so they are retired with it (`companions`).
  var detachedRecords: [CodeArena.Block] = []
  /// Stubs (`MultiStub`) retired since padding last got its NOPs back: a thread at a stub's
  /// `call` is about to enter a global trampoline that reads the padding, so they count as
  /// global trampolines for `restorePaddingNops` until one pass finds none busy.
  var retiredStubs: [Range<UInt64>] = []
  /// Stub blocks of detached bulk links that a general function (one that left the link) still
  /// jumps to: retired once none does (`Tracer.retireOrphanStubs`).
  var orphanStubs: [CodeImage] = []
}

/// The 8-byte padding word before a function's entry that multi-attach keeps a record pointer
/// in, and the words some tracer of this process set to 0 when a function left a global
/// trampoline: usable padding for any tracer although they no longer hold the compiler's NOPs.
/// Process-wide because padding is text that every `Tracer` shares. A tracer takes a zeroed word
/// out (`claim`) before writing a record pointer into it and before putting NOPs back, so the
/// two never race.
enum ZeroedPadding {
  private static let words = Mutex(Set<UInt64>())

  /// What the compiler leaves there (`-fpatchable-function-entry=N,8`).
  static let nops: UInt64 = 0x9090_9090_9090_9090

  /// The word before `site`, or nil when `site` is not 8-byte aligned (no padding word then) or
  /// that word is not mapped (a site at the start of a mapping: read through the kernel then).
  /// Precondition: `site` is a mapped function's patch site.
  static func word(before site: UInt64) -> UInt64? {
    guard site % 8 == 0 else { return nil }
    if site % System.pageSize >= 8 { return UnsafePointer<UInt64>(bitPattern: UInt(site - 8))!.pointee }
    var word: UInt64 = 0
    let read = ctracery_read_memory(&word, UnsafeRawPointer(bitPattern: UInt(site - 8)), 8)
    return read == 8 ? word : nil
  }

  /// Takes the word before `site` when it is a zeroed one (0 now, and in the set).
  static func claim(before site: UInt64) -> Bool { word(before: site) == 0 && claim(site - 8) }

  static func add(_ addresses: some Collection<UInt64>) {
    guard !addresses.isEmpty else { return }
    words.withLock { $0.formUnion(addresses) }
  }

  /// Takes `address` out; true when it was there.
  static func claim(_ address: UInt64) -> Bool { words.withLock { $0.remove(address) != nil } }

  /// Takes out those of `addresses` that are there; returns them.
  static func claim(all addresses: some Collection<UInt64>) -> [UInt64] {
    words.withLock { words in addresses.filter { words.remove($0) != nil } }
  }
}

struct MultiKey: Equatable {
  let integerArguments: Int
  let floats: Bool
  let padding: Bool
  /// Entered from `MultiStub`s (`MultiEmitter.viaStub`), not from sites.
  let stub: Bool
  /// Entered from `PrologueStub`s (`MultiEmitter.keepsEveryRegister`).
  var keepsEveryRegister = false
}

extension Tracer.TracedFunction {
  /// The class of every multi attachment together: the widest.
  var multiClass: FunctionModel {
    MultiEmitter.classModel(
      integerArguments: multi.map(\.model.integerArguments).max() ?? 6,
      floats: multi.contains { $0.model.floatArguments > 0 })
  }

  /// Whether its multi handlers run in a per-function trampoline rather than the global one.
  var multiNeedsOwnTrampoline: Bool {
    multi.contains { $0.strategy == .perFunction } || !attachments.isEmpty || !ops.isEmpty || graphMask != 0
      || patch.keepsEveryRegister
  }

  /// Whether its site goes to the global trampoline through a `MultiStub`: it has handlers that
  /// run after the body, so the trampoline calls the body and returns; or its body does not
  /// follow its site (relocated), so a trampoline entered by `call` could not return into it.
  var multiNeedsStub: Bool { multi.contains { $0.kind != .entry } || !patch.bodyFollowsBranch }

  /// Whether the global trampoline finds its record in its padding.
  var usesPadding: Bool {
    !multi.isEmpty && multi.allSatisfy { $0.strategy != .global(.hash) } && hasPadding
  }

  /// The address of the record word of the `MultiStub` it jumps to, when its stub calls one of
  /// `trampolines` (`Tracer.recordStubTrampolines`); nil for a function with no such stub (or
  /// whose stub is a `PrologueStub`, whose trampoline keeps every register).
  func recordStub(_ trampolines: Set<UInt64>) -> UInt64? {
    guard let stub = multiStub, let entry = multiEntry, trampolines.contains(entry) else { return nil }
    return stub + UInt64(MultiStub.recordOffset)
  }

  /// Eight NOP bytes (or a record pointer of ours) before an entry that is the site itself.
  var hasPadding: Bool {
    guard site == function, let word = ZeroedPadding.word(before: site) else { return false }
    return paddingOwned || word == ZeroedPadding.nops
  }
}

extension Tracer {
  /// Attaches `handler` to every function `selector` selects, with a cookie per function, in one
  /// batch. Exit and modify-return handlers need `model` (at most six integer and eight vector
  /// arguments, no stack arguments); entry handlers without one save every argument register.
  ///
  /// With a global strategy, the selected functions nothing traces yet form one bulk link
  /// (`BulkLink`: ~95 ns per function at 50,000); the others get a multi attachment in the
  /// general bookkeeping. `cookie` is called once per selected function, on this thread, before
  /// any is attached.
  /// - Throws: `AttachError` when nothing matches or the model does not fit a class.
  @discardableResult
  public func attachMulti(
    _ handler: Handler, to selector: FunctionSelector, cookie: (_ function: UInt64) -> UInt64 = { _ in 0 },
    model: FunctionModel? = nil, strategy: MultiStrategy = .automatic
  ) throws(AttachError) -> MultiLink {
    let targets = try resolve(selector)
    let chosen = model ?? .unknown
    if handler.kind != .entry, chosen.stackArgumentWords != 0 || chosen.integerArguments > 6 {
      throw .unsupportedModel(
        function: "multi attachment",
        reason: "exit and modify-return handlers need a FunctionModel with at most 6 integer arguments "
          + "and no stack arguments")
    }
    let classModel = MultiEmitter.classModel(
      integerArguments: min(chosen.integerArguments, 6), floats: chosen.floatArguments > 0 || chosen.isVariadic)
    let resolved: MultiStrategy =
      strategy == .automatic
      ? (targets.count <= MultiStrategy.perFunctionLimit ? .perFunction : .global(.automatic)) : strategy
    let id = nextLinkID()
    // The caller's closure runs here, once per function, before the lock (it may do anything).
    let cookies = [UInt64](unsafeUninitializedCapacity: targets.count) { buffer, count in
      for index in targets.indices { buffer[index] = cookie(targets[index].function) }
      count = targets.count
    }
    var rest = Array(targets.indices)
    var report = TransactionReport()
    if case .global(let lookup) = resolved {
      // Functions nothing traces yet join a bulk link: no per-function bookkeeping.
      (rest, report) = try withCallerStackMarker { callerStack throws(AttachError) in
        try state.withLock { state throws(AttachError) in
          try attachBulk(
            id: id, kind: handler.kind, handler: handler.address, model: classModel, lookup: lookup,
            targets: targets, cookies: cookies, state: &state, callerStack: callerStack)
        }
      }
    }
    if !rest.isEmpty {
      let attachments = rest.map { index in
        MultiAttachment(
          link: id, kind: handler.kind, handler: handler.address, cookie: cookies[index], model: classModel,
          strategy: resolved)
      }
      report.append(contentsOf: commit([.multiAttach(attachments, rest.map { targets[$0] })]))
    }
    if !hasMultiSites(id) { throw .nothingAttached(report) }
    return MultiLink(tracer: self, id: id)
  }

  /// Bytes of the current multi record table (records, and hash slots when any function uses
  /// the hash), for measuring memory per attached function.
  public var multiTableBytes: Int {
    state.withLock { state in
      (state.multi.table?.length ?? 0) + state.multi.bulk.reduce(0) { $0 + ($1.records?.length ?? 0) }
    }
  }

  func hasMultiSites(_ id: Int) -> Bool {
    state.withLock { state in
      state.multi.bulk.contains { $0.id == id && !$0.sites.isEmpty }
        || state.functions.values.contains { $0.multi.contains { $0.link == id } }
    }
  }

  func multiSites(of id: Int) -> [UInt64] {
    state.withLock { state in
      let general = state.functions.values.filter { $0.multi.contains { $0.link == id } }.map(\.site)
      let bulk = state.multi.bulk.filter { $0.id == id }.flatMap(\.sites)
      return general.isEmpty ? bulk : (general + bulk).sorted()
    }
  }

  /// The global trampoline for `function`'s class and lookup, called from `caller` (its site,
  /// or its stub).
  func multiTrampoline(for function: TracedFunction, from caller: UInt64, state: inout State) throws -> UInt64 {
    if function.multi.contains(where: { $0.strategy == .global(.padding) }), !function.hasPadding {
      throw AttachError.noPatchSite(
        function: function.name,
        reason: "no 8 bytes of NOP padding before its entry for the record pointer "
          + "(build with -fpatchable-function-entry=13,8, or use .global(.hash))")
    }
    let model = function.multiClass
    let key = MultiKey(
      integerArguments: model.integerArguments, floats: model.floatArguments > 0, padding: function.usesPadding,
      stub: function.multiNeedsStub)
    return try globalTrampoline(key: key, model: model, near: caller, state: &state)
  }

  /// A `MultiStub` of its own for `function` (within reach of its site), calling its global
  /// trampoline; returns the stub and the trampoline.
  func multiStub(for function: TracedFunction, state: inout State) throws -> (stub: CodeImage, trampoline: UInt64) {
    let block: CodeArena.Block
    do { block = try arena.allocate(near: function.site, size: MultiStub.size) } catch {
      throw AttachError.codeMemory("\(error)")
    }
    do {
      let trampoline = try multiTrampoline(for: function, from: block.address, state: &state)
      guard let bytes = MultiStub.bytes(at: block.address, patch: function.patch, trampoline: trampoline) else {
        throw AttachError.codeMemory("multi-attach stub out of reach of 0x\(String(function.site, radix: 16))")
      }
      block.write(bytes)
      return (CodeImage(block: block, length: MultiStub.size), trampoline)
    } catch {
      arena.release(block)
      throw error
    }
  }

  /// Retires a block of stubs no site jumps to any more (see `MultiState.retiredStubs`).
  func retireStub(_ stub: CodeImage, state: inout State) {
    state.multi.retiredStubs.append(stub.block.range)
    state.reclaimer.retire(stub)
  }

  /// Addresses general functions lead to that may lie in bulk links' stub blocks: the stubs their
  /// sites jump to, and the relocated copies that functions which left a relocated bulk link go
  /// on in (`PrologueStub`).
  func usedStubAddresses(_ state: borrowing State) -> [UInt64] {
    state.functions.values.compactMap(\.multiStub)
      + state.functions.values.lazy.filter { $0.patch.shape == .relocated && $0.relocatedCopy == nil }.map(
        \.patch.resume)
  }

  /// Retires the stub blocks of detached bulk links that no general function jumps to now.
  func retireOrphanStubs(state: inout State) {
    guard !state.multi.orphanStubs.isEmpty else { return }
    let used = usedStubAddresses(state)
    var kept: [CodeImage] = []
    for stub in state.multi.orphanStubs {
      if used.contains(where: stub.block.range.contains) { kept.append(stub) } else { retireStub(stub, state: &state) }
    }
    state.multi.orphanStubs = kept
  }

  /// The global trampoline for `key` within rel32 reach of `site`, made on first use.
  func globalTrampoline(key: MultiKey, model: FunctionModel, near site: UInt64, state: inout State) throws -> UInt64 {
    if let found = state.multi.trampolines.first(where: {
      $0.key == key && SiteBytes.branch(0xe8, at: site, to: $0.image.block.address) != nil
    }) {
      return found.image.block.address
    }
    var emitter = MultiEmitter(
      model: model, lookup: key.padding ? .padding : .hash(table: UInt64(UInt(bitPattern: state.multi.tableWord))),
      guardOffset: guardOffset)
    emitter.viaStub = key.stub
    emitter.keepsEveryRegister = key.keepsEveryRegister
    // (Emitting again where it lands used to leak the block when it failed.)
    let (block, code) = try placeCode(near: site, slack: 16, emit: emitter.emit(at:), bytes: { $0 })
    let image = CodeImage(block: block, length: code.count)
    state.multi.trampolines.append((key, image))
    return block.address
  }

  /// Builds the record table for every function served by a global trampoline (`functions`)
  /// and every hash-mode bulk link, publishes it (hash word; padding pointers of `functions`),
  /// and retires the previous one. Returns the functions whose padding could not be written.
  ///
  /// Block: [shift, mask, (site, record) × 2^bits] when anything is hashed, then the records of
  /// `functions`. Bulk links' records stay in their own blocks (written once, at attach).
  func publishMultiTable(_ functions: [TracedFunction], state: inout State) throws -> Set<UInt64> {
    let bulkHashed = state.multi.bulk.filter { !$0.padding }
    let hashedCount = functions.count(where: { !$0.usesPadding }) + bulkHashed.reduce(0) { $0 + $1.sites.count }
    let bits = SiteHash.bits(for: hashedCount)
    let header = hashedCount == 0 ? 0 : 2 + 2 * (1 << bits)
    let recordWords = functions.reduce(0) { $0 + MultiRecord.words(handlers: $1.multi.count) }
    guard header + recordWords > 0 else {
      ctracery_store_release(state.multi.tableWord, 0)
      retireMultiTable(state: &state)
      state.multi.table = nil
      return []
    }
    let block: CodeArena.Block
    do {
      block = try arena.allocate(
        near: functions.first?.site ?? bulkHashed.lazy.compactMap(\.sites.first).first!,
        size: 8 * (header + recordWords))
    } catch {
      throw AttachError.codeMemory("\(error)")
    }
    let words = block.words(count: header + recordWords)
    words.update(repeating: 0, count: header)
    let mask = (1 << bits) - 1
    let shift = SiteHash.shift(bits: bits)
    func insert(_ site: UInt64, record: UInt64) {
      var slot = SiteHash.start(site, shift: shift)
      while words[2 + 2 * slot] != 0 { slot = (slot + 1) & mask }
      words[2 + 2 * slot] = site
      words[3 + 2 * slot] = record
    }
    var paddingPointers: [(address: UInt64, value: UInt64)] = []
    // Stubs' record words (`MultiStub`): every stub a current function jumps to, 0 unless its
    // function keeps a record in this table (a commit may be replacing it; a thread may read
    // its word until the stub is freed, so no word may point into the table retired below).
    let recordStubs = recordStubTrampolines(state)
    var stubWords: [UInt64: UInt64] = [:]
    for function in state.functions.values {
      if let stub = function.recordStub(recordStubs) { stubWords[stub] = 0 }
    }
    var at = header
    for function in functions {
      let record = block.address + UInt64(8 * at)
      if function.usesPadding {
        paddingPointers.append((function.site - 8, record))
      } else {
        insert(function.site, record: record)
        if let stub = function.recordStub(recordStubs) { stubWords[stub] = record }
      }
      at += MultiRecord.write(
        words + at, handlers: function.multi.map { (kind: $0.kind, handler: $0.handler, cookie: $0.cookie) })
    }
    for link in bulkHashed {
      let records = link.records!.block.address
      for index in link.sites.indices {
        insert(link.sites[index], record: records + UInt64(8 * link.recordOffsets[index]))
      }
    }
    if hashedCount > 0 {
      words[0] = shift
      words[1] = UInt64(mask)
    }
    ctracery_store_release(state.multi.tableWord, hashedCount == 0 ? 0 : block.address)
    arena.storeWords(stubWords.map { ($0.key, $0.value) })
    let failed = patcher.writeWords(paddingPointers)
    retireMultiTable(state: &state)
    state.multi.table = CodeImage(block: block, length: 8 * (header + recordWords))
    return Set(failed.map { $0 + 8 })
  }

  /// The global trampolines that read a `MultiStub`'s record word: hash-mode, entered from stubs.
  func recordStubTrampolines(_ state: borrowing State) -> Set<UInt64> {
    Set(
      state.multi.trampolines.lazy.filter { $0.key.stub && !$0.key.padding && !$0.key.keepsEveryRegister }.map(
        \.image.block.address))
  }

  /// Retires the current table, with the records of hash-mode bulk links detached since it was
  /// published (a reader holding it may still reach them).
  private func retireMultiTable(state: inout State) {
    guard let old = state.multi.table else {
      // No table: no reader can reach them through one.
      for block in state.multi.detachedRecords {
        state.reclaimer.retire(
          CodeImage(block: block, length: block.size))
      }
      state.multi.detachedRecords = []
      return
    }
    old.companions += state.multi.detachedRecords
    state.multi.detachedRecords = []
    state.reclaimer.retire(old)
  }
}
