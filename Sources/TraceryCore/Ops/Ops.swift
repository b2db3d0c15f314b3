import CTracery
import TraceryX86

/// An ops callback (the kernel's `ftrace_func_t`): called at the entry of every function in the
/// ops' set, with the call's register view (`tracery_call`: `function` is the patch site,
/// `return_address`, `arguments`, `rax`, `float_arguments`, and `stack_arguments` = the stack
/// pointer at entry + 8), which it may read and change (see `OpsEmitter`), and the ops' cookie.
public typealias OpsCallback = @convention(c) (UnsafeMutablePointer<tracery_call>, UInt64) -> Void

/// How an ops is called.
public struct OpsFlags: OptionSet, Sendable {
  public let rawValue: Int
  public init(rawValue: Int) { self.rawValue = rawValue }

  /// Called even while this thread is inside another handler (no recursion guard; the callback
  /// must not call traced functions). Only honoured where the ops is called alone.
  public static let allowRecursion = OpsFlags(rawValue: 1)
  /// Always called through the shared caller, never through its own trampoline (the kernel's
  /// ops that need the list function; here mostly for measuring the shared caller).
  public static let alwaysShared = OpsFlags(rawValue: 2)
}

/// One ops (a tracing user: a callback, a set of functions, flags). Keep it to keep the ops
/// attached; `detach()` removes it from every function in one batch.
public final class OpsLink: Sendable {
  let tracer: Tracer
  let id: Int

  init(tracer: Tracer, id: Int) {
    self.tracer = tracer
    self.id = id
  }

  /// The patch sites this ops is attached to now.
  public var sites: [UInt64] { tracer.opsSites(of: id) }

  /// This ops' own trampolines (one per ±2 GiB region it serves), for tests and diagnostics.
  public var ownTrampolines: [UInt64] { tracer.opsOwnTrampolines(of: id) }

  @discardableResult
  public func detach() -> TransactionReport { tracer.commit([.opsDetach(id)]) }
}

/// An ops as the tracer keeps it.
final class OpsRecord: @unchecked Sendable {
  // @unchecked: the mutable fields are touched only under the tracer's lock (in commit).
  let id: Int
  let callback: UInt64
  let cookie: UInt64
  let flags: OpsFlags
  /// For a function that also has per-function trampolines: the callback runs there as an entry
  /// handler, and these are its (unused) counters.
  let counters = AttachmentCounters()
  /// The ops' own trampolines, one per region.
  var ownImages: [CodeImage] = []
  /// The sites the ops was attached to (its filter minus its notrace, resolved).
  var sites: Set<UInt64> = []

  init(id: Int, callback: UInt64, cookie: UInt64, flags: OpsFlags) {
    self.id = id
    self.callback = callback
    self.cookie = cookie
    self.flags = flags
  }

  var handlerCall: HandlerCall {
    HandlerCall(handler: callback, cookie: cookie, counters: counters.address, statistics: .none)
  }
}

/// The shared caller's data: every ops with its set of sites, frozen when the caller image is
/// made and freed with it (the image's `CodeImage.keepAlive`).
///
/// Layout (words): count, then per ops: callback, cookie, set address, set shift; each set is a
/// `SiteHash` table of sites, 2^(64 - shift) words.
final class OpsTable: @unchecked Sendable {
  // @unchecked: immutable after init; read by the dispatcher on any thread.
  let words: UnsafeMutablePointer<UInt64>
  let count: Int

  init(_ ops: [(record: OpsRecord, sites: Set<UInt64>)]) {
    var layout = [UInt64(ops.count)]
    var sets: [(at: Int, shift: UInt64, sites: Set<UInt64>)] = []
    for (record, sites) in ops {
      layout += [record.callback, record.cookie, 0, 0]
      sets.append((layout.count - 2, 0, sites))
    }
    var tables: [UInt64] = []
    var offsets: [Int] = []
    for index in sets.indices {
      let bits = SiteHash.bits(for: sets[index].sites.count)
      sets[index].shift = SiteHash.shift(bits: bits)
      var slots = [UInt64](repeating: 0, count: 1 << bits)
      for (site, slot) in SiteHash.place(sets[index].sites, bits: bits) { slots[slot] = site }
      offsets.append(layout.count + tables.count)
      tables += slots
    }
    count = layout.count + tables.count
    words = .allocate(capacity: count)
    words.initialize(from: layout + tables, count: count)
    for (index, set) in sets.enumerated() {
      words[set.at] = UInt64(UInt(bitPattern: words + offsets[index]))
      words[set.at + 1] = set.shift
    }
  }

  deinit { words.deallocate() }

  var address: UInt64 { UInt64(UInt(bitPattern: words)) }

  /// Called by the shared caller (`void dispatch(table, call)`, guard held): every ops whose set
  /// holds the site, in attach order.
  static let dispatch: @convention(c) (UnsafeRawPointer?, UnsafeMutablePointer<tracery_call>?) -> Void = {
    table, call in
    let words = table!.assumingMemoryBound(to: UInt64.self)
    let site = call!.pointee.function
    var entry = words + 1
    for _ in 0..<Int(words[0]) {
      let set = UnsafePointer<UInt64>(bitPattern: UInt(entry[2]))!
      if SiteHash.find(site, shift: entry[3], keys: set) != nil {
        unsafeBitCast(UnsafeRawPointer(bitPattern: UInt(entry[0]))!, to: OpsCallback.self)(call!, entry[1])
      }
      entry += 4
    }
  }
}

/// One shared caller image (code and the table it passes), for one ±2 GiB region.
struct OpsSharedImage {
  let image: CodeImage
  var entry: UInt64 { image.block.address }
}

extension Tracer {
  /// Attaches an ops: `callback` at the entry of every function `filter` selects except those
  /// `notrace` selects, in one batch. A function with this ops alone calls the ops' own
  /// trampoline (which calls `callback` directly); a function shared with other ops goes
  /// through the shared caller, which tests every ops' set; a function that also has
  /// per-function trampolines, multi handlers or graph users runs the callback in its own
  /// per-function trampoline, before the entry handlers (a changed `function` is ignored there).
  /// - Throws: `AttachError` when nothing matches (or everything was excluded).
  @discardableResult
  public func attachOps(
    _ callback: OpsCallback, to filter: FunctionSelector, except notrace: FunctionSelector? = nil,
    cookie: UInt64 = 0, flags: OpsFlags = []
  ) throws(AttachError) -> OpsLink {
    var transaction = Transaction(tracer: self)
    let link = try transaction.attachOps(callback, to: filter, except: notrace, cookie: cookie, flags: flags)
    let report = transaction.commit()
    if link.sites.isEmpty { throw .nothingAttached(report) }
    return link
  }

  func opsSites(of id: Int) -> [UInt64] {
    state.withLock { state in state.functions.values.filter { $0.ops.contains(id) }.map(\.site).sorted() }
  }

  func opsOwnTrampolines(of id: Int) -> [UInt64] {
    state.withLock { state in state.ops[id]?.ownImages.map(\.block.address) ?? [] }
  }

  /// The ops image a site with these ops calls: the single ops' own trampoline, or the shared
  /// caller (made when none within reach exists).
  func opsEntry(for function: TracedFunction, state: inout State) throws -> UInt64 {
    let site = function.site
    if function.ops.count == 1, let record = state.ops[function.ops[0]], !record.flags.contains(.alwaysShared) {
      if let image = record.ownImages.first(where: { X86Instruction.call(at: site, to: $0.block.address) != nil }) {
        return image.block.address
      }
      let emitter = OpsEmitter(
        target: .callback(record.callback, cookie: record.cookie), guarded: !record.flags.contains(.allowRecursion),
        guardOffset: guardOffset)
      let image = try opsImage(emitter, near: site, keepAlive: nil)
      record.ownImages.append(image)
      return image.block.address
    }
    if let image = state.opsSharedImages.first(where: { X86Instruction.call(at: site, to: $0.entry) != nil }) {
      return image.entry
    }
    let table = OpsTable(state.ops.keys.sorted().map { (state.ops[$0]!, state.ops[$0]!.sites) })
    let emitter = OpsEmitter(
      target: .dispatcher(address(OpsTable.dispatch), table: table.address), guarded: true, guardOffset: guardOffset)
    let image = OpsSharedImage(image: try opsImage(emitter, near: site, keepAlive: table))
    state.opsSharedImages.append(image)
    return image.entry
  }

  private func opsImage(_ emitter: OpsEmitter, near site: UInt64, keepAlive: (any AnyObject & Sendable)?) throws
    -> CodeImage
  {
    let (block, code) = try placeCode(near: site, slack: 16, emit: emitter.emit(at:), bytes: { $0 })
    return CodeImage(
      block: block, length: code.count, frame: nil, unwind: nil, counters: [], keepAlive: keepAlive)
  }
}

private func address<T>(_ function: T) -> UInt64 {
  UInt64(UInt(bitPattern: unsafeBitCast(function, to: UnsafeRawPointer.self)))
}
