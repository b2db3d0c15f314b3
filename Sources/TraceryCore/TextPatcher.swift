import CTraceryShims
import Synchronization
import TraceryX86

#if canImport(Glibc)
  import Glibc
#endif

/// One 5-byte site to rewrite: the bytes that must be there now and the ones to put there.
/// Kept packed (a word each), so a batch of 50,000 requests allocates nothing per site.
public struct PatchRequest: Sendable, Equatable {
  public let site: UInt64
  /// Where a thread that traps on the site goes when the new bytes are not a branch (the
  /// original code: `PatchSite.resume`).
  public let resume: UInt64
  /// Packed 5-byte forms, or nil when the given bytes were not 5 (step 1 then fails the request).
  let expectedBytes: SiteBytes?
  let replacementBytes: SiteBytes?
  /// How many bytes were given of each (at most 255 said), for step 1's refusal. (Counts, not
  /// the arrays: a request holds no reference, so a batch's arrays of 50,000 are copied and
  /// freed without visiting each request.)
  private let expectedCount: UInt8
  private let replacementCount: UInt8
  /// A trap site's target, or a relocated prologue's copy (`relocatedLength` not 0): one word,
  /// the two never go together (a request stays a few words).
  private let special: UInt64
  /// For a relocated prologue being traced: the bytes its moved instructions cover. While other
  /// threads run, one stopped inside the site's first 5 bytes is moved to the same instruction
  /// in the copy (`relocatedCopy`) before the branch's displacement is written over it. 0: none.
  let relocatedLength: UInt8

  /// For a trap site being traced (`PatchSite.Shape.trap`; the replacement is `int3` and the
  /// site's own next 4 bytes): where a thread reaching the int3 goes. 0 otherwise.
  var trapTarget: UInt64 { relocatedLength == 0 ? special : 0 }
  var relocatedCopy: UInt64 { relocatedLength == 0 ? 0 : special }
  /// More than a NOP/branch rewrite: a trap site, a relocated prologue, or a site whose body
  /// does not follow it (`resume` elsewhere). A batch without any does no per-site work for them.
  var isSpecial: Bool { special != 0 || resume != site + UInt64(SiteBytes.length) }

  /// The bytes the site must hold, and those it gets: empty for a request not given 5 of each.
  public var expected: [UInt8] { expectedBytes?.bytes ?? [] }
  public var replacement: [UInt8] { replacementBytes?.bytes ?? [] }
  /// Why step 1 refuses a request not given 5 bytes of each (nil: it was).
  var malformed: String? {
    guard expectedBytes == nil || replacementBytes == nil else { return nil }
    return "a patch site is 5 bytes; got \(expectedCount) → \(replacementCount)"
  }

  /// A request for a NOP site (`PatchSite.nop`); `init(patch:expected:replacement:)` for others.
  public init(site: UInt64, expected: [UInt8], replacement: [UInt8]) {
    self.init(patch: .nop(at: site), expected: expected, replacement: replacement)
  }

  public init(patch: PatchSite, expected: [UInt8], replacement: [UInt8]) {
    site = patch.address
    resume = patch.resume
    expectedBytes = SiteBytes(expected)
    replacementBytes = SiteBytes(replacement)
    expectedCount = UInt8(clamping: expected.count)
    replacementCount = UInt8(clamping: replacement.count)
    special = 0
    relocatedLength = 0
  }

  init(
    site: UInt64, expected: SiteBytes, replacement: SiteBytes, resume: UInt64? = nil, trapTarget: UInt64 = 0,
    relocatedCopy: UInt64 = 0, relocatedLength: UInt8 = 0
  ) {
    self.site = site
    self.resume = resume ?? PatchSite.nop(at: site).resume
    expectedBytes = expected
    replacementBytes = replacement
    expectedCount = 5
    replacementCount = 5
    precondition(trapTarget == 0 || relocatedLength == 0, "a site is a trap site or a relocated one")
    special = relocatedLength == 0 ? trapTarget : relocatedCopy
    self.relocatedLength = relocatedLength
  }
}

/// What a batch did to one site. A site that cannot be patched never stops the others.
public enum PatchOutcome: Sendable, Equatable, CustomStringConvertible {
  case patched
  /// Nothing to do, or deliberately not done; the site is as it was.
  case skipped(String)
  /// The request could not be carried out; the site is as it was.
  case failed(String)

  public var description: String {
    switch self {
    case .patched: return "patched"
    case .skipped(let reason): return "skipped: \(reason)"
    case .failed(let reason): return "failed: \(reason)"
    }
  }
}

/// Rewrites live 5-byte patch sites while other threads may be executing them: the kernel's
/// `text_poke_bp_batch` in user space.
///
/// One process-wide instance; batches are serialised by its lock. Any thread may call `apply`.
public final class TextPatcher: Sendable {
  public static let shared = TextPatcher()

  /// Counters for tests and `tracery bench`.
  public struct Statistics: Sendable, Equatable {
    public var batches = 0
    public var sitesPatched = 0
    public var mprotectCalls = 0
  }

  private struct State: ~Copyable {
    var statistics = Statistics()
    /// Poke tables unpublished but perhaps still read by a SIGTRAP handler.
    var retired: [PokeTable] = []
    /// The trap table's sites (`ctracery_publish_traps`): trap sites (JMP, to their target) and
    /// sites whose moved code came back over an int3 (REWIND). Entries stay: a thread may trap
    /// on an int3 and reach its handler only after the site changed again.
    var traps: [UInt64: ctracery_poke] = [:]
    var trapTable: PokeTable?
  }

  private let state = Mutex(State())

  private init() {}

  public var statistics: Statistics { state.withLock { $0.statistics } }

  /// Whether core syncs use membarrier (else the TLB-shootdown fallback).
  public var usesMembarrier: Bool { CoreSync.usesMembarrier }

  /// Rewrites every site of `requests` in one batch and reports, per request, what happened.
  ///
  /// The protocol (other threads may run any site at any moment):
  ///   1. Verify: each site lies in executable memory and holds `expected` (else failed) or
  ///      already holds `replacement` (else skipped). Nothing is written for those.
  ///   2. Make every page holding an accepted site writable, once, keeping it executable.
  ///   3. Publish the batch to the SIGTRAP handler (sorted by site).
  ///   4. Write `int3` over the first byte of every site; sync all cores. From here a thread
  ///      reaching a site traps and the handler emulates the new instruction.
  ///   4½. Relocated prologues, while other threads run: every other thread stopped inside a
  ///      site's first 5 bytes is moved to the same instruction in its copy; a site some thread
  ///      still refers into (a signal frame) is abandoned: its first byte put back.
  ///   5. Write bytes 1...4 of every site; sync. No thread can decode them: byte 0 is int3.
  ///   6. Write the new first byte of every site; sync. Each site is now whole and new.
  ///   7. Unpublish the batch and wait for handlers still reading it; a handler that runs later
  ///      finds the new byte and re-executes it.
  ///   8. Restore every page's protection, and read each site back.
  public func apply(_ requests: [PatchRequest]) -> [PatchOutcome] {
    applyReporting(requests).outcomes
  }

  /// `apply` for the tracer: with a memory map the caller read moments ago under the same lock
  /// (one read of /proc/self/maps, ~0.2 ms, instead of two when words and sites change
  /// together), and its caller's stack marker (`withCallerStackMarker`): this thread is scanned
  /// from there up when relocated sites need every thread out of their first bytes, so the
  /// tracer's own bookkeeping (sites and their neighbours in its frames) is not taken for a
  /// thread inside one.
  func apply(_ requests: [PatchRequest], map: MemoryMap? = nil, callerStack: UInt64) -> [PatchOutcome] {
    applyReporting(requests, map: map, callerStack: callerStack).outcomes
  }

  /// What one call of `applyReporting` did.
  public struct BatchReport: Sendable {
    /// Per request, in request order.
    public var outcomes: [PatchOutcome]
    /// Core-serialising syncs issued (3 for any batch that wrote anything, 0 otherwise).
    public var coreSyncs = 0
    /// Page ranges made writable (one mprotect each way per range).
    public var writableRanges = 0
  }

  /// `apply`, also saying how much work the batch took.
  public func applyReporting(_ requests: [PatchRequest]) -> BatchReport { applyReporting(requests, map: nil) }

  private func applyReporting(_ requests: [PatchRequest], map given: MemoryMap?) -> BatchReport {
    // Step 4½ scans this thread from here up: the batch's own frames hold the sites' addresses
    // and their neighbours (a spilled site + 1 made a relocation look entered).
    withCallerStackMarker { callerStack in applyReporting(requests, map: given, callerStack: callerStack) }
  }

  private func applyReporting(_ requests: [PatchRequest], map given: MemoryMap?, callerStack: UInt64) -> BatchReport {
    state.withLock { state in
      var report = BatchReport(outcomes: [PatchOutcome](repeating: .patched, count: requests.count))
      guard !requests.isEmpty else { return report }
      if ctracery_install_trap_handler() != 0 {
        let reason = "cannot install the SIGTRAP handler: \(SystemError(call: "sigaction", errno: errno))"
        report.outcomes = report.outcomes.map { _ in .failed(reason) }
        return report
      }
      let map = given ?? MemoryMap.current()
      // Step 1.
      var kinds = SpecialKinds()
      var accepted = step1Verify(requests, map: map, outcomes: &report.outcomes, kinds: &kinds)
      guard !accepted.isEmpty else { return report }
      // Step 2: the pages of the sites writable; steps 3-7 while they are; step 8 (their
      // protection back) when `withWritablePages` returns.
      let runs = step2PageRuns(&accepted, map: map, outcomes: &report.outcomes)
      let written = Self.withWritablePages(runs.map(\.pages)) { refused -> Bool in
        state.statistics.mprotectCalls += (runs.count - refused.count) * 2
        report.writableRanges = runs.count - refused.count
        if !refused.isEmpty {
          for (index, error) in refused {
            for site in accepted[runs[index].sites] {
              report.outcomes[site.request] = .failed("cannot make its page writable: \(error)")
            }
          }
          var kept = accepted
          for index in refused.keys.sorted(by: >) { kept.removeSubrange(runs[index].sites) }
          accepted = kept
        }
        guard !accepted.isEmpty else { return false }
        // (Each pass over the specials only when the batch holds its kind: a bulk attach of
        // 50,000 relocated functions has nothing for the trap table, and three passes over all
        // of them for it were a quarter of its batch.)
        let specials = kinds.trapTargets || kinds.restoresMovedCode ? Self.specials(accepted, requests) : []
        if kinds.trapTargets { publishTraps(specials, of: accepted, requests, restored: false, state: &state) }
        var retired = state.retired
        state.retired = []
        defer { state.retired += retired }
        let abandoned = step3to7Write(
          accepted, relocating: kinds.relocatedCopies, requests: requests, retired: &retired,
          callerStack: callerStack
        ) {
          abandoned in
          // Before the batch is unpublished (a late trap finds one table or the other): an
          // abandoned site got its own first byte back over an int3, so a thread that trapped
          // there meanwhile re-executes it (a rewind entry, like a restored relocated site's).
          guard kinds.restoresMovedCode || !abandoned.isEmpty else { return }
          publishTraps(
            kinds.restoresMovedCode ? specials : abandoned.keys.sorted(), of: accepted, requests, restored: true,
            state: &state, rewinding: Set(abandoned.keys.map { accepted[$0].address }))
        }
        for (index, reason) in abandoned {
          report.outcomes[accepted[index].request] = .failed(reason)
        }
        if !abandoned.isEmpty { accepted = accepted.indices.filter { abandoned[$0] == nil }.map { accepted[$0] } }
        return true
      }
      guard written else { return report }
      report.coreSyncs = 3
      for site in accepted where !SiteBytes(reading: site.address).matches(site.replacement, in: site.owned) {
        report.outcomes[site.request] = .failed("read-back after patching does not match")
      }
      state.statistics.batches += 1
      state.statistics.sitesPatched += accepted.count
      return report
    }
  }

  /// Stores 8-byte words of data into code pages (function padding that is never executed), one
  /// aligned store each (single-copy atomic: a reader sees the old or the new word), making each
  /// run of pages writable once (and keeping it executable: other threads run code there).
  /// Returns the addresses that could not be written.
  public func writeWords(_ words: [(address: UInt64, value: UInt64)]) -> [UInt64] {
    writeWords(words, map: nil)
  }

  /// `writeWords` with a memory map the caller read under the same lock (see `apply(_:map:)`).
  func writeWords(_ words: [(address: UInt64, value: UInt64)], map given: MemoryMap?) -> [UInt64] {
    guard !words.isEmpty else { return [] }
    return state.withLock { state in
      let map = given ?? MemoryMap.current()
      var failed: [UInt64] = []
      let sorted =
        words.isAscending(strictly: false, by: { $0.address }) ? words : words.sorted { $0.address < $1.address }
      var start = 0
      while start < sorted.count {
        let address = sorted[start].address
        guard address % 8 == 0, let region = map.region(containing: address), region.end >= address + 8 else {
          failed.append(address)
          start += 1
          continue
        }
        let first = System.pageStart(address)
        var end = System.pageEnd(address + 8)
        var stop = start + 1
        while stop < sorted.count, System.pageStart(sorted[stop].address) <= end, sorted[stop].address % 8 == 0,
          sorted[stop].address + 8 <= region.end
        {
          end = max(end, System.pageEnd(sorted[stop].address + 8))
          stop += 1
        }
        let pages = Protection(start: first, length: end - first, protection: region.protection)
        Self.withWritablePages([pages]) { refused in
          guard refused.isEmpty else {
            failed += sorted[start..<stop].map(\.address)
            return
          }
          // One C call for the run: a tuple of two words is laid out as the pair the shim reads.
          sorted[start..<stop].withUnsafeBufferPointer { run in
            ctracery_store_release_pairs(
              UnsafeRawPointer(run.baseAddress!).assumingMemoryBound(to: UInt64.self), run.count)
          }
          state.statistics.mprotectCalls += 2
        }
        start = stop
      }
      return failed
    }
  }

  /// A request that passed step 1.
  struct AcceptedSite {
    let request: Int
    let address: UInt64
    let replacement: SiteBytes
    let kind: ctracery_poke_kind
    /// The bytes the request owns (`SiteBytes.changed(to:)`): the only ones it writes and reads
    /// back. (Bit i for byte i: beside `kind`, it keeps the record at 40 bytes.)
    let owned: UInt8
    /// Where a trapping thread goes when the new bytes are no branch: the original code's
    /// resume address, or a trap site's target (`PatchRequest.trapTarget`).
    let resume: UInt64
  }

  /// What step 1 saw of the requests that are more than a NOP/branch rewrite (`isSpecial`), so
  /// that a batch without a kind makes no pass over its sites for it.
  struct SpecialKinds {
    /// Trap sites made: their trap table entries go in before step 3.
    var trapTargets = false
    /// Moved code put back (a relocated or trap site restored): rewind entries after step 6.
    var restoresMovedCode = false
    /// Relocated prologues installed: step 4½ when other threads run.
    var relocatedCopies = false
  }

  /// The accepted sites (indices) that are more than a NOP/branch rewrite: trap sites, and
  /// relocated prologues installed or put back. Usually none: a batch of plain sites then does
  /// nothing more per site than before trap and relocated sites existed.
  private static func specials(_ accepted: [AcceptedSite], _ requests: [PatchRequest]) -> [Int] {
    accepted.indices.filter { requests[accepted[$0].request].isSpecial }
  }

  /// Before step 3 (`restored` false): trap sites this batch makes enter the trap table (to
  /// their target). After step 6, before the batch table is unpublished (`restored` true): sites
  /// whose moved code it put back, and sites abandoned in step 4½ (`rewinding`), are marked to
  /// rewind. (Marked before the batch, a thread that trapped on a trap site's int3 before it and
  /// reached its handler before step 4 would find neither its target nor its code.) Published
  /// at once when anything changed; the old table is retired like a batch's.
  /// `specials`: indices in `accepted` (`Self.specials`). (Read in place: an array of the sites
  /// and their requests, 50,000 of them in a bulk attach of relocated functions, cost ~1 ms of
  /// it to build and walk twice, for tables such an attach leaves as they are.)
  private func publishTraps(
    _ specials: [Int], of accepted: [AcceptedSite], _ requests: [PatchRequest], restored: Bool, state: inout State,
    rewinding: Set<UInt64> = []
  ) {
    var changed = false
    for index in specials {
      let site = accepted[index]
      let trapTarget = requests[site.request].trapTarget
      let entry: ctracery_poke
      if !restored && trapTarget != 0 {
        entry = ctracery_poke(site: site.address, target: trapTarget, kind: UInt64(CTRACERY_POKE_JMP.rawValue))
      } else if restored
        && (rewinding.contains(site.address)
          || (site.kind == CTRACERY_POKE_SKIP && site.resume != site.address + UInt64(SiteBytes.length)))
      {
        entry = ctracery_poke(site: site.address, target: site.address, kind: UInt64(CTRACERY_POKE_REWIND.rawValue))
      } else {
        continue
      }
      if let old = state.traps[site.address], old.target == entry.target, old.kind == entry.kind { continue }
      state.traps[site.address] = entry
      changed = true
    }
    guard changed else { return }
    let table = PokeTable(state.traps.values.sorted { $0.site < $1.site })
    ctracery_publish_traps(table.header)
    if let old = state.trapTable { state.retired.append(old) }
    state.trapTable = table
  }

  /// The trap sites now (for tests): site → where a thread reaching it goes.
  public var trapSites: [UInt64: UInt64] {
    state.withLock { state in
      state.traps.filter { $0.value.kind == UInt64(CTRACERY_POKE_JMP.rawValue) }.mapValues(\.target)
    }
  }

  /// Step 1: the requests to carry out, sorted by site; outcomes for the others.
  /// `kinds`: which kinds of special request it accepted.
  private func step1Verify(
    _ requests: [PatchRequest], map: MemoryMap, outcomes: inout [PatchOutcome], kinds: inout SpecialKinds
  ) -> [AcceptedSite] {
    var accepted: [AcceptedSite] = []
    accepted.reserveCapacity(requests.count)
    var hint = 0
    for (index, request) in requests.enumerated() {
      guard let expected = request.expectedBytes, let replacement = request.replacementBytes else {
        outcomes[index] = .failed(request.malformed ?? "")
        continue
      }
      // Back to the original code of a site whose body does not follow it (relocated, trap):
      // any bytes; a thread that traps on them meanwhile runs their copy (`resume`). To a trap
      // site: `int3` and the site's own bytes; a thread that traps meanwhile goes to its target.
      let restoresMovedCode = request.resume != request.site + UInt64(SiteBytes.length)
      let kind =
        request.trapTarget != 0
        ? CTRACERY_POKE_JMP : replacement.pokeKind ?? (restoresMovedCode ? CTRACERY_POKE_SKIP : nil)
      guard let kind else {
        outcomes[index] = .failed("replacement \(Self.hex(request.replacement)) is not a nop5, call rel32 or jmp rel32")
        continue
      }
      guard map.isExecutable(request.site, count: 5, hint: &hint) else {
        outcomes[index] = .failed("0x\(String(request.site, radix: 16)) is not in readable executable memory")
        continue
      }
      let current = SiteBytes(reading: request.site)
      // (A NOP or branch rewrite owns all 5 bytes, as it always did: only trap and relocated
      // sites pay for the mask.)
      let owned = request.isSpecial ? expected.changed(to: replacement) : SiteBytes.whole
      if current.matches(replacement, in: owned) {
        outcomes[index] = .skipped("already holds \(Self.hex(request.replacement))")
      } else if !current.matches(expected, in: owned) {
        outcomes[index] = .failed(
          "site 0x\(String(request.site, radix: 16)) holds \(Self.hex(current.bytes)), expected \(Self.hex(request.expected))"
        )
      } else {
        accepted.append(
          AcceptedSite(
            request: index, address: request.site, replacement: replacement, kind: kind, owned: owned,
            resume: request.trapTarget != 0 ? request.trapTarget : request.resume))
        if request.trapTarget != 0 { kinds.trapTargets = true }
        if kind == CTRACERY_POKE_SKIP && restoresMovedCode { kinds.restoresMovedCode = true }
        if request.relocatedCopy != 0 { kinds.relocatedCopies = true }
      }
    }
    // Batches usually come sorted without repeats: then no sort and no second array (at 50,000
    // sites every fresh array is megabytes of page faults).
    if accepted.isAscending(strictly: true, by: { $0.address }) {
      return accepted
    }
    accepted.sort { $0.address < $1.address }
    var unique: [AcceptedSite] = []
    unique.reserveCapacity(accepted.count)
    for site in accepted {
      if let last = unique.last, last.address == site.address {
        outcomes[site.request] = .failed("site 0x\(String(site.address, radix: 16)) appears twice in one batch")
      } else {
        unique.append(site)
      }
    }
    return unique
  }

  struct Protection {
    let start: UInt64
    let length: UInt64
    let protection: Int32
  }

  /// Step 2: the pages of `sites` (sorted) as runs of consecutive pages within one mapping, each
  /// with the range of sites on it, to be made writable together (`withWritablePages`). Sites in
  /// no mapping are marked failed and removed.
  private func step2PageRuns(
    _ sites: inout [AcceptedSite], map: MemoryMap, outcomes: inout [PatchOutcome]
  ) -> [(pages: Protection, sites: Range<Int>)] {
    var runs: [(pages: Protection, sites: Range<Int>)] = []
    var runStart = 0
    while runStart < sites.count {
      // One lookup per run, not per site (50,000 sites fall in a few dozen runs).
      guard let region = map.region(containing: sites[runStart].address) else {
        outcomes[sites[runStart].request] = .failed("not mapped")
        sites.remove(at: runStart)
        continue
      }
      let first = System.pageStart(sites[runStart].address)
      let written = UInt64(SiteBytes.length)
      var end = System.pageEnd(sites[runStart].address + written)
      var runEnd = runStart + 1
      // Extend over following sites in the same mapping whose pages touch or overlap the run.
      while runEnd < sites.count, System.pageStart(sites[runEnd].address) <= end,
        sites[runEnd].address + written <= region.end
      {
        end = max(end, System.pageEnd(sites[runEnd].address + written))
        runEnd += 1
      }
      runs.append((Protection(start: first, length: end - first, protection: region.protection), runStart..<runEnd))
      runStart = runEnd
    }
    return runs
  }

  /// Runs `body` with the pages of `ranges` writable (XRay's MProtectHelper): each range gets
  /// PROT_WRITE added to its protection (PROT_EXEC kept: other threads run code there); `body`
  /// learns which ranges could not be made writable (index → error); every range that was gets
  /// its protection back when `body` returns.
  static func withWritablePages<T>(_ ranges: [Protection], _ body: (_ refused: [Int: SystemError]) throws -> T) rethrows
    -> T
  {
    var made: [Protection] = []
    var refused: [Int: SystemError] = [:]
    for (index, range) in ranges.enumerated() {
      do {
        try System.mprotect(range.start, range.length, range.protection | PROT_WRITE | PROT_EXEC)
        made.append(range)
      } catch {
        refused[index] = error
      }
    }
    defer { for range in made { try? System.mprotect(range.start, range.length, range.protection) } }
    return try body(refused)
  }

  /// Steps 3-7 on sites already verified, sorted by address, on writable pages.
  /// Returns the sites (by index) abandoned after step 4, with why: their first byte is back and
  /// the rest never changed.
  /// `relocating`: some request installs a relocated prologue (`SpecialKinds.relocatedCopies`).
  private func step3to7Write(
    _ all: [AcceptedSite], relocating: Bool, requests: [PatchRequest], retired: inout [PokeTable],
    callerStack: UInt64, beforeUnpublishing: ([Int: String]) -> Void
  ) -> [Int: String] {
    let table = PokeTable(all)
    // Step 3. Publishing is sequentially consistent, and the writes below follow an opaque call,
    // so no int3 can become visible before the table.
    ctracery_publish_pokes(table.header)
    // Step 4.
    for site in all { Self.pointer(site.address).pointee = 0xcc }
    CoreSync.syncAllCores()
    // Step 4½: no thread may stay inside a prologue whose bytes 1-4 change (relocated sites).
    // (Threads that start from here on cannot be inside: every site's first byte is int3 now.)
    let moving =
      relocating && Reclaimer.threadIDs().count > 1
      ? all.indices.filter { requests[all[$0].request].relocatedCopy != 0 } : []
    let abandoned =
      !moving.isEmpty
      ? Self.moveThreadsOut(
        of: moving.map { (index: $0, request: requests[all[$0].request]) }, callerStack: callerStack) : [:]
    if !abandoned.isEmpty {
      // The request's expected bytes are what the site held before the batch.
      for index in abandoned.keys {
        Self.pointer(all[index].address).pointee = requests[all[index].request].expectedBytes!.byte(0)
      }
      CoreSync.syncAllCores()
    }
    let sites = abandoned.isEmpty ? all : all.indices.filter { abandoned[$0] == nil }.map { all[$0] }
    // Step 5.
    for site in sites {
      let pointer = Self.pointer(site.address)
      if site.owned == SiteBytes.whole {
        for offset in 1..<5 { pointer[offset] = site.replacement.byte(offset) }
      } else {
        for offset in 1..<5 where site.owned & (1 << offset) != 0 { pointer[offset] = site.replacement.byte(offset) }
      }
    }
    CoreSync.syncAllCores()
    // Step 6.
    for site in sites { Self.pointer(site.address).pointee = site.replacement.byte(0) }
    CoreSync.syncAllCores()
    beforeUnpublishing(abandoned)
    // Step 7. A handler may still be reading this table (a trapped thread can be descheduled
    // anywhere in its handler): retire it, and free every retired table once no handler is in
    // flight. Waiting here instead could cost a whole scheduler time slice per batch.
    ctracery_publish_pokes(nil)
    retired.append(table)
    if retired.count > 64 {
      while ctracery_trap_handlers_in_flight() != 0 { sched_yield() }
    }
    if ctracery_trap_handlers_in_flight() == 0 { retired.removeAll() }
    return abandoned
  }

  /// The move table last published (kept until the next one: a snapshot signal that arrives
  /// after its request timed out may still read it).
  nonisolated(unsafe) private static var lastMoves:
    (UnsafeMutablePointer<ctracery_move_table>, UnsafeMutablePointer<UInt64>)?

  /// Step 4½, with every relocated site's int3 in place (no thread can enter its first 5 bytes
  /// any more): every other thread is snapshotted with the sites' moves published, so one
  /// stopped inside those bytes continues at the same instruction in the copy
  /// (`ctracery_publish_moves`). Then any thread still referencing an address inside them — a
  /// signal frame's saved rip (a handler running on top of such a thread), a blocked thread,
  /// a register — makes its site abandoned, as does a thread that cannot be inspected.
  /// `moving`: each site's index in the batch and its request.
  /// `callerStack`: this thread is scanned from there up (`withCallerStackMarker`).
  private static func moveThreadsOut(
    of moving: [(index: Int, request: PatchRequest)], callerStack: UInt64
  ) -> [Int: String] {
    let flat = moving.flatMap { moves(of: $0.request) }
    let pairs = UnsafeMutablePointer<UInt64>.allocate(capacity: max(1, flat.count))
    pairs.initialize(from: flat, count: flat.count)
    let table = UnsafeMutablePointer<ctracery_move_table>.allocate(capacity: 1)
    table.initialize(to: ctracery_move_table(pairs: pairs, count: flat.count / 2))
    ctracery_publish_moves(table)
    let interiors = moving.map { ($0.request.site + 1)..<($0.request.site + UInt64(SiteBytes.length)) }
    // A thread inside the SIGTRAP handler for one of these int3s has the site + 1 in its signal
    // frame until the handler returns (in microseconds): look again a few times before giving up.
    var outcome = Reclaimer.busyRanges(interiors, callerStack: callerStack, stackWords: .signalFrames)
    for _ in 0..<5 {
      guard case .success(let busy) = outcome, !busy.isEmpty else { break }
      usleep(200)
      outcome = Reclaimer.busyRanges(interiors, callerStack: callerStack, stackWords: .signalFrames)
    }
    ctracery_publish_moves(nil)
    if let (previousTable, previousPairs) = lastMoves {
      previousTable.deallocate()
      previousPairs.deallocate()
    }
    lastMoves = (table, pairs)
    switch outcome {
    case .success(let busy):
      return Dictionary(
        uniqueKeysWithValues: busy.map { index, holder in
          (moving[index].index, "\(abandoned): an address inside its first 5 bytes is held (\(holder))")
        })
    case .failure(let obstacle):
      return Dictionary(
        uniqueKeysWithValues: moving.map {
          ($0.index, "\(abandoned): threads cannot all be inspected: \(obstacle.reason)")
        })
    }
  }

  /// (from, to) pairs for a relocated site: each instruction that starts inside its first 5
  /// bytes (past the first) and the same instruction in its copy. From the code as it was (its
  /// first byte is int3 by now).
  private static func moves(of request: PatchRequest) -> [UInt64] {
    let site = request.site
    var code = Array(
      UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(site)), count: Int(request.relocatedLength) + 15))
    code[0] = request.expectedBytes!.byte(0)
    let relocation = code.withUnsafeBytes { raw in
      try? X86Relocator.relocate(raw, at: site, to: request.relocatedCopy, minimum: Int(request.relocatedLength))
    }
    var pairs: [UInt64] = []
    for boundary in relocation?.boundaries ?? [] where (1..<SiteBytes.length).contains(boundary.original) {
      pairs.append(site + UInt64(boundary.original))
      pairs.append(request.relocatedCopy + UInt64(boundary.copy))
    }
    return pairs
  }

  /// How the outcome of a relocated site abandoned in step 4½ begins (`Tracer.commit` then
  /// traces the function through an int3).
  static let abandoned = "relocation abandoned"

  /// Rewrites gcc's five 1-byte NOPs at each of `sites` into one 5-byte NOP.
  ///
  /// A thread could be stopped between two of those NOPs, and would resume inside whatever is
  /// written over them, so this is done only while this thread is the process's only thread
  /// (when an object is first processed, before other threads start); otherwise every site is
  /// refused with that reason.
  public func convertSleds(_ sites: [UInt64]) -> [PatchOutcome] {
    state.withLock { state in
      let threads = System.threadCount()
      guard threads == 1 else {
        let reason =
          "gcc 5×1-byte NOP sled: cannot be rewritten while \(threads - 1) other thread(s) run; build with clang "
          + "-fpatchable-function-entry=5 or gcc -pg -mfentry -mnop-mcount -mrecord-mcount, or preload the agent"
        return sites.map { _ in .failed(reason) }
      }
      let map = MemoryMap.current()
      let sled: [UInt8] = [0x90, 0x90, 0x90, 0x90, 0x90]
      var outcomes: [PatchOutcome] = []
      for site in sites {
        guard map.isExecutable(site, count: 5) else {
          outcomes.append(.failed("0x\(String(site, radix: 16)) is not in readable executable memory"))
          continue
        }
        let current = Self.read(site)
        guard current != X86Instruction.nop5 else {
          outcomes.append(.skipped("already a 5-byte NOP"))
          continue
        }
        guard current == sled else {
          outcomes.append(.failed("site 0x\(String(site, radix: 16)) holds \(Self.hex(current)), not a 5×nop sled"))
          continue
        }
        guard let region = map.region(containing: site) else { continue }
        let start = System.pageStart(site)
        let end = System.pageEnd(site + UInt64(SiteBytes.length))
        let pages = Protection(start: start, length: end - start, protection: region.protection)
        Self.withWritablePages([pages]) { refused in
          if let error = refused.values.first {
            outcomes.append(.failed("cannot make its page writable: \(error)"))
            return
          }
          let pointer = Self.pointer(site)
          for (offset, byte) in X86Instruction.nop5.enumerated() { pointer[offset] = byte }
          state.statistics.mprotectCalls += 2
          outcomes.append(.patched)
        }
      }
      return outcomes
    }
  }

  // MARK: - Helpers

  static func pointer(_ address: UInt64) -> UnsafeMutablePointer<UInt8> {
    UnsafeMutablePointer(bitPattern: UInt(address))!
  }

  /// The 5 bytes at `site`. Precondition: mapped readable (checked against the memory map).
  package static func read(_ site: UInt64) -> [UInt8] { SiteBytes(reading: site).bytes }

  static func hex(_ bytes: [UInt8]) -> String {
    bytes.map { $0 < 16 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined(separator: " ")
  }
}

/// How often the SIGTRAP handler caught a thread on a site mid-patch (process lifetime).
public enum TrapStatistics {
  public static var handled: UInt64 { ctracery_traps_handled() }
}

/// A batch's sites as the SIGTRAP handler reads them: one C table, sorted by site.
///
/// Invariant: immutable after `init`; freed by `deinit` only once the patcher has retired it and
/// seen no handler in flight (so no handler holds a pointer into it).
final class PokeTable: @unchecked Sendable {
  // @unchecked: immutable after init, and its lifetime is managed by the retire protocol above.
  let header: UnsafeMutablePointer<ctracery_poke_table>
  private let pokes: UnsafeMutablePointer<ctracery_poke>

  convenience init(_ sites: [TextPatcher.AcceptedSite]) {
    self.init(
      sites.map { site in
        let target =
          site.replacement.branchTarget(at: site.address) ?? site.resume
        return ctracery_poke(site: site.address, target: target, kind: UInt64(site.kind.rawValue))
      })
  }

  /// `entries` sorted by site.
  init(_ entries: [ctracery_poke]) {
    pokes = .allocate(capacity: max(entries.count, 1))
    for (index, entry) in entries.enumerated() { (pokes + index).initialize(to: entry) }
    header = .allocate(capacity: 1)
    header.initialize(to: ctracery_poke_table(pokes: pokes, count: entries.count))
  }

  deinit {
    header.deallocate()
    pokes.deallocate()
  }
}

/// Five instruction bytes packed into the low 40 bits of a word, so a batch compares and copies
/// sites without allocating.
struct SiteBytes: Equatable, Sendable {
  let raw: UInt64

  /// The length of every branch Tracery writes at a site (`call`/`jmp rel32`).
  static let length = 5

  init(raw: UInt64) { self.raw = raw }

  /// A 5-byte NOP (`0f 1f 44 00 xx`, any displacement: compilers differ).
  var isNop5: Bool { raw & 0xffff_ffff == 0x0044_1f0f }

  /// `call rel32` (0xe8) or `jmp rel32` (0xe9) at `site` to `target`, or nil when out of reach.
  static func branch(_ opcode: UInt8, at site: UInt64, to target: UInt64) -> SiteBytes? {
    let distance = Int64(bitPattern: target &- (site &+ UInt64(length)))
    guard let rel = Int32(exactly: distance) else { return nil }
    return SiteBytes(raw: UInt64(opcode) | UInt64(UInt32(bitPattern: rel)) << 8)
  }

  init?(_ bytes: [UInt8]) {
    guard bytes.count == 5 else { return nil }
    var raw: UInt64 = 0
    for (index, byte) in bytes.enumerated() { raw |= UInt64(byte) << (8 * UInt64(index)) }
    self.raw = raw
  }

  /// The 5 bytes at `address`. Precondition: mapped readable.
  init(reading address: UInt64) {
    let pointer = UnsafePointer<UInt8>(bitPattern: UInt(address))!
    var raw: UInt64 = 0
    for index in 0..<5 { raw |= UInt64(pointer[index]) << (8 * UInt64(index)) }
    self.raw = raw
  }

  func byte(_ index: Int) -> UInt8 { UInt8(truncatingIfNeeded: raw >> (8 * UInt64(index))) }

  /// The bytes a request from these bytes to `replacement` owns: the first (it carries
  /// the int3 while the batch runs) and every other that differs. A trap site (`int3` and its own
  /// next 4 bytes) owns its first byte only, so it may end less than 5 bytes before another
  /// function whose own site changes in the same batch (a 4-byte function right before the
  /// next): its request neither writes nor checks that function's bytes.
  /// Bit i set for byte i.
  func changed(to replacement: SiteBytes) -> UInt8 {
    var owned: UInt8 = 1
    for index in 1..<5 where byte(index) != replacement.byte(index) { owned |= 1 << index }
    return owned
  }

  /// All 5 bytes.
  static var whole: UInt8 { 0x1f }

  /// `owned` (bit i for byte i) as a mask of the bytes in `raw`.
  static func mask(_ owned: UInt8) -> UInt64 {
    (0..<5).reduce(0) { mask, index in owned & (1 << index) != 0 ? mask | 0xff << (8 * UInt64(index)) : mask }
  }

  /// Whether these bytes equal `other`'s in the bytes `owned` names.
  @inline(__always)
  func matches(_ other: SiteBytes, in owned: UInt8) -> Bool {
    owned == Self.whole ? raw == other.raw : raw & Self.mask(owned) == other.raw & Self.mask(owned)
  }

  var bytes: [UInt8] { (0..<5).map(byte) }

  /// What the SIGTRAP handler must emulate for these bytes, or nil if it cannot.
  var pokeKind: ctracery_poke_kind? {
    switch byte(0) {
    case 0xe8: return CTRACERY_POKE_CALL
    case 0xe9: return CTRACERY_POKE_JMP
    case 0x0f where byte(1) == 0x1f && byte(2) == 0x44 && byte(3) == 0x00: return CTRACERY_POKE_SKIP
    default: return nil
    }
  }

  /// The destination of a `call`/`jmp rel32` placed at `site`.
  func branchTarget(at site: UInt64) -> UInt64? {
    guard byte(0) == 0xe8 || byte(0) == 0xe9 else { return nil }
    let rel = Int32(bitPattern: UInt32(truncatingIfNeeded: raw >> 8))
    return site &+ 5 &+ UInt64(bitPattern: Int64(rel))
  }
}
