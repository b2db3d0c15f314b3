import CTracery
import CTraceryShims
import Glibc
import Synchronization
import TraceryX86

/// An fprobe entry handler: the probed function's patch site, the call's register view, the
/// probe's data word (kept for its exit), the cookie. Return non-zero to skip this call's exit.
public typealias FprobeEntryHandler =
  @convention(c) (UInt64, UnsafeMutablePointer<tracery_call>, UnsafeMutablePointer<UInt64>, UInt64) -> Int32
/// An fprobe exit handler: as the entry's, with `call.return_value` set; `data` holds what the
/// entry stored.
public typealias FprobeExitHandler =
  @convention(c) (UInt64, UnsafeMutablePointer<tracery_call>, UnsafeMutablePointer<UInt64>, UInt64) -> Void

/// One registered fprobe (the kernel's fprobe, built on its function graph). Keep it to keep it registered.
public final class Fprobe: Sendable {
  let tracer: Tracer
  let slot: Int

  init(tracer: Tracer, slot: Int) {
    self.tracer = tracer
    self.slot = slot
  }

  /// Unregisters the probe (one batch). A call in flight is not given to its exit handler.
  public func unregister() { tracer.unregisterFprobe(slot: slot) }
}

/// Many probes share two tracing users: probes with an exit handler put their functions in one
/// function-graph user (`exitUser`), entry-only probes theirs in one plain ops (no shadow frame
/// for those calls: the kernel measured ~5% for that push). A function with both kinds is in the
/// graph user, whose entry runs every probe's entry.
///
/// Finding a function's probes: an immutable site table (`FprobeTable`, open addressing, O(1)),
/// published through `FprobeRoot.current`; readers take no lock. A reader announces the table it
/// reads in a stack-resident atomic (a hazard pointer) and re-checks `current`; a replaced table
/// is retired to the tracer's reclaimer, whose stack scan sees any reader's hazard, so it is freed
/// only once no reader holds it.
///
/// Probe identity: a probe is a slot (index) with a generation, odd while registered. A call's
/// frame keeps (index, generation) for up to `FprobeRoot.exitsPerCall` probes; its exit handler
/// runs only if the slot still has that generation, so an unregistered probe is never called
/// at exit, and a new probe in the same slot is never taken for it. More probes with exits on one
/// call than that are counted in `missed` and get no exit.
///
/// Protocol: registration and the tables are changed under `Tracer.fprobes`; slots' handler
/// words are written before their generation is made odd (release), read by handlers after
/// they read an odd generation.
final class FprobeRoot: @unchecked Sendable {
  // @unchecked: `slots` words are written under the registry lock and read with the protocol
  // above; `current` and `missed` are atomics.
  static let capacity = 4096
  static let slotWords = 4  // generation, entry handler, exit handler, cookie
  static let exitsPerCall = 3

  let current = Atomic<UInt64>(0)
  let missed = Atomic<UInt64>(0)
  /// Zeroed by `calloc`, which maps fresh pages for 128 KiB and so writes none of them: every
  /// tracer (the agent's, in every traced process) makes a root, few register a probe (a
  /// zeroing loop cost each traced process ~30 µs of page faults).
  let slots: UnsafeMutablePointer<UInt64> = {
    let bytes = calloc(FprobeRoot.capacity * FprobeRoot.slotWords, 8)!
    return bytes.bindMemory(to: UInt64.self, capacity: FprobeRoot.capacity * FprobeRoot.slotWords)
  }()

  var address: UInt64 { UInt64(UInt(bitPattern: Unmanaged.passUnretained(self).toOpaque())) }

  /// Runs `body` with the root a handler's cookie names, without retaining it (the tracer
  /// keeps it alive; handlers must not pay two atomic reference-count updates per call).
  @inline(__always)
  static func with<T>(_ cookie: UInt64, _ body: (FprobeRoot) -> T) -> T {
    Unmanaged<FprobeRoot>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(cookie))!)._withUnsafeGuaranteedRef(body)
  }

  func slot(_ index: Int) -> UnsafeMutablePointer<UInt64> { slots + index * Self.slotWords }

  /// A registered probe's words, read consistently (the generation is read before and after,
  /// as a sequence lock); nil when the slot is free or changed meanwhile.
  @inline(__always)
  func probe(_ index: Int) -> (generation: UInt64, entry: UInt64, exit: UInt64, cookie: UInt64)? {
    let words = slot(index)
    let generation = words[0]
    guard generation & 1 == 1 else { return nil }
    atomicMemoryFence(ordering: .acquiring)
    let probe = (generation, words[1], words[2], words[3])
    atomicMemoryFence(ordering: .acquiring)
    return words[0] == generation ? probe : nil
  }

  /// Runs `body` with the probe slots registered at `site` (none: not called), holding a hazard
  /// on the table for the duration.
  @inline(__always)
  func withProbes(at site: UInt64, _ body: (UnsafePointer<UInt32>, Int) -> Void) {
    // No store-load fence between publishing the hazard and re-reading `current`: the
    // reclaimer inspects a running thread only after interrupting it with its snapshot signal,
    // which drains the thread's stores first (an asymmetric fence), and a thread blocked in the
    // kernel is not between the two. So a hazard that the re-check did not order is still seen.
    let hazard = Atomic<UInt64>(0)
    var table = current.load(ordering: .acquiring)
    while true {
      hazard.store(table, ordering: .releasing)
      let again = current.load(ordering: .acquiring)
      if again == table { break }
      table = again
    }
    if table != 0, let (list, count) = FprobeTable.lookup(table, site) { body(list, count) }
    hazard.store(0, ordering: .releasing)
  }

  /// The ops callback for entry-only sites.
  static let opsEntry: OpsCallback = { call, cookie in FprobeRoot.with(cookie) { $0.entryOnly(call) } }

  private func entryOnly(_ call: UnsafeMutablePointer<tracery_call>) {
    let root = self
    let site = call.pointee.function
    root.withProbes(at: site) { list, count in
      var scratch: UInt64 = 0
      for index in 0..<count {
        guard let probe = root.probe(Int(list[index])), probe.entry != 0 else { continue }
        _ = unsafeBitCast(UnsafeRawPointer(bitPattern: UInt(probe.entry))!, to: FprobeEntryHandler.self)(
          site, call, &scratch, probe.cookie)
      }
    }
  }

  /// The graph user's entry: every probe's entry; the first `exitsPerCall` probes with an exit
  /// get a (slot, generation) pair and a data word in the frame: data[2k], data[2k+1].
  static let graphEntry: GraphEntryHandler = { frame, data, call, cookie in
    FprobeRoot.with(cookie) { $0.entry(frame, data, call) }
  }

  private func entry(
    _ frame: UnsafeMutablePointer<tracery_graph_frame>, _ data: UnsafeMutablePointer<UInt64>,
    _ call: UnsafeMutablePointer<tracery_call>
  ) -> Int32 {
    let root = self
    let exitsPerCall = Self.exitsPerCall
    let site = frame.pointee.site
    var taken = 0
    for pair in 0..<exitsPerCall { data[2 * pair] = 0 }
    root.withProbes(at: site) { list, count in
      var scratch: UInt64 = 0
      for index in 0..<count {
        let number = Int(list[index])
        guard let probe = root.probe(number) else { continue }
        let wantsExit = probe.exit != 0
        let word: UnsafeMutablePointer<UInt64>
        if wantsExit && taken < exitsPerCall {
          word = data + 2 * taken + 1
          word.pointee = 0
        } else {
          if wantsExit { root.missed.add(1, ordering: .relaxed) }
          word = withUnsafeMutablePointer(to: &scratch) { $0 }
        }
        var skip: Int32 = 0
        if probe.entry != 0 {
          skip = unsafeBitCast(UnsafeRawPointer(bitPattern: UInt(probe.entry))!, to: FprobeEntryHandler.self)(
            site, call, word, probe.cookie)
        }
        if wantsExit && taken < exitsPerCall && skip == 0 {
          data[2 * taken] = UInt64(number) << 32 | (probe.generation & 0xffff_ffff)
          taken += 1
        }
      }
    }
    return taken > 0 ? 1 : 0
  }

  /// The graph user's exit: each recorded probe whose slot still has its generation.
  static let graphExit: GraphExitHandler = { frame, data, call, cookie in
    FprobeRoot.with(cookie) { $0.exit(frame, data, call) }
  }

  private func exit(
    _ frame: UnsafeMutablePointer<tracery_graph_frame>, _ data: UnsafeMutablePointer<UInt64>,
    _ call: UnsafeMutablePointer<tracery_call>
  ) {
    let root = self
    for pair in 0..<Self.exitsPerCall {
      let identity = data[2 * pair]
      guard identity != 0 else { break }
      guard let probe = root.probe(Int(identity >> 32)),
        probe.generation & 0xffff_ffff == identity & 0xffff_ffff, probe.exit != 0
      else { continue }
      unsafeBitCast(UnsafeRawPointer(bitPattern: UInt(probe.exit))!, to: FprobeExitHandler.self)(
        frame.pointee.site, call, data + 2 * pair + 1, probe.cookie)
    }
  }
}

/// An immutable site → probe-slots table in a code-arena block (so the reclaimer can retire it):
/// word 0 the shift, then 2^(64 - shift) pairs (site, offset of its list in words; site 0 =
/// empty), then the lists: count, then the slot numbers as UInt32.
enum FprobeTable {
  static func build(_ probes: [UInt64: [Int]]) -> [UInt64] {
    let bits = SiteHash.bits(for: probes.count)
    var words = [UInt64](repeating: 0, count: 1 + 2 * (1 << bits))
    words[0] = SiteHash.shift(bits: bits)
    for (site, index) in SiteHash.place(probes.keys.sorted(), bits: bits) {
      let slots = probes[site]!
      words[1 + 2 * index] = site
      words[2 + 2 * index] = UInt64(words.count)
      words.append(UInt64(slots.count))
      for pair in stride(from: 0, to: slots.count, by: 2) {
        let high = pair + 1 < slots.count ? UInt64(slots[pair + 1]) << 32 : 0
        words.append(UInt64(slots[pair]) | high)
      }
    }
    return words
  }

  @inline(__always)
  static func lookup(_ table: UInt64, _ site: UInt64) -> (UnsafePointer<UInt32>, Int)? {
    let words = UnsafePointer<UInt64>(bitPattern: UInt(table))!
    guard let index = SiteHash.find(site, shift: words[0], keys: words + 1, stride: 2) else { return nil }
    let list = words + Int(words[2 + 2 * index])
    return (UnsafeRawPointer(list + 1).assumingMemoryBound(to: UInt32.self), Int(list[0]))
  }
}

/// The probes of one tracer (under `Tracer.fprobes`).
struct FprobeRegistry: ~Copyable {
  let root = FprobeRoot()
  /// Per registered slot: its sites and whether it has an exit handler.
  var probes: [Int: (sites: [UInt64], exit: Bool)] = [:]
  var ops: OpsLink?
  var graph: GraphLink?
  var table: CodeImage?
}

extension Tracer {
  /// Registers an fprobe on every function `selector` selects: `entry` and/or `exit` run on
  /// each call (one batch). Probes with an exit handler trace their functions through the
  /// function graph (one user for all probes, 6 of the frame's data words); entry-only probes
  /// through one plain ops.
  /// - Throws: `AttachError` when nothing matches, or when 4,096 probes are registered.
  @discardableResult
  public func registerFprobe(
    entry: FprobeEntryHandler?, exit: FprobeExitHandler?, to selector: FunctionSelector, cookie: UInt64 = 0
  ) throws(AttachError) -> Fprobe {
    let sites = try resolve(selector).map(\.site)
    return try fprobes.withLock { registry throws(AttachError) in
      let root = registry.root
      guard let slot = (0..<FprobeRoot.capacity).first(where: { root.slot($0)[0] & 1 == 0 }) else {
        throw .fprobesExhausted
      }
      let words = root.slot(slot)
      words[1] = entry.map { UInt64(UInt(bitPattern: unsafeBitCast($0, to: UnsafeRawPointer.self))) } ?? 0
      words[2] = exit.map { UInt64(UInt(bitPattern: unsafeBitCast($0, to: UnsafeRawPointer.self))) } ?? 0
      words[3] = cookie
      ctracery_store_release(words, words[0] + 1)
      registry.probes[slot] = (sites, exit != nil)
      do throws(AttachError) {
        try update(&registry)
      } catch {
        // Not attached after all: free the slot again (a new generation) and say why.
        registry.probes[slot] = nil
        ctracery_store_release(words, words[0] + 1)
        try? update(&registry)
        throw error
      }
      return Fprobe(tracer: self, slot: slot)
    }
  }

  /// Probes with an exit handler that found no room in a call's frame (more than 3 on one call).
  public var fprobeMissedExits: UInt64 { fprobes.withLock { $0.root.missed.load(ordering: .relaxed) } }

  func unregisterFprobe(slot: Int) {
    fprobes.withLock { registry in
      guard registry.probes.removeValue(forKey: slot) != nil else { return }
      let words = registry.root.slot(slot)
      ctracery_store_release(words, words[0] + 1)
      try? update(&registry)
    }
  }

  /// Publishes a new site table and moves the two users' sites (one batch): sites leave first,
  /// then arrive, so a site can move from the ops to the graph user in the same batch.
  private func update(_ registry: inout FprobeRegistry) throws(AttachError) {
    var bySite: [UInt64: [Int]] = [:]
    var graphSites: Set<UInt64> = []
    for (slot, probe) in registry.probes.sorted(by: { $0.key < $1.key }) {
      for site in probe.sites {
        bySite[site, default: []].append(slot)
        if probe.exit { graphSites.insert(site) }
      }
    }
    let opsSites = Set(bySite.keys).subtracting(graphSites)
    // The table first: a site reached before its probes are in the table just finds none.
    let words = FprobeTable.build(bySite)
    let block: CodeArena.Block
    do {
      block = try arena.allocate(near: UInt64(UInt(bitPattern: registry.root.slots)), size: words.count * 8)
    } catch {
      throw .codeMemory("\(error)")
    }
    block.write(words.withUnsafeBytes { Array($0) })
    registry.root.current.store(block.address, ordering: .sequentiallyConsistent)
    let old = registry.table
    registry.table = CodeImage(block: block, length: words.count * 8)

    var operations: [Operation] = []
    let current = Set(registry.graph?.sites ?? [])
    if let graph = registry.graph {
      operations.append(.graphRemoveSites(graph.index, Array(current.subtracting(graphSites))))
    }
    if let ops = registry.ops {
      operations.append(.opsDetach(ops.id))
      registry.ops = nil
    }
    if !opsSites.isEmpty {
      var transaction = Transaction(tracer: self)
      registry.ops = try transaction.attachOps(
        FprobeRoot.opsEntry, to: .addresses(Array(opsSites)), cookie: registry.root.address)
      operations += transaction.operations
    }
    let arriving = graphSites.subtracting(current)
    if !arriving.isEmpty {
      if registry.graph == nil {
        registry.graph = try makeGraphUser(
          .handlers(entry: FprobeRoot.graphEntry, exit: FprobeRoot.graphExit), cookie: registry.root.address,
          dataWords: 2 * FprobeRoot.exitsPerCall, depthLimit: nil)
      }
      operations.append(.graphAttach(registry.graph!.index, try resolve(.addresses(Array(arriving))), nil))
    }
    _ = commit(operations)
    state.withLock { state in if let old { state.reclaimer.retire(old) } }
    if graphSites.isEmpty, let graph = registry.graph {
      graph.detach()
      registry.graph = nil
    }
  }
}
