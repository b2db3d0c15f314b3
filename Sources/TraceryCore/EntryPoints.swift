import Synchronization
import TraceryELF
import TraceryX86

/// The places in an object that code reaches other than by falling into them: the targets of
/// its direct branches and calls, from a sweep of every function (its symbols, and its `.eh_frame`
/// FDEs, which stripped objects keep: `.cold` parts included), and its C++ exception landing pads
/// (which no branch shows: the unwinder jumps there). A relocated prologue must hold none of them
/// past its first byte, since those bytes become the branch's displacement.
///
/// What the sweep cannot decode (data in code, an instruction the decoder does not know) ends that
/// function's sweep: its remaining branches are not seen (`unswept` counts such functions).
///
/// A class: resolving thousands of relocated functions hands it on per function, and copying
/// its five arrays each time (retains and releases) was a tenth of that work.
public final class EntryPoints: Sendable {
  /// Link-time addresses, sorted, without repeats.
  let targets: [UInt64]
  /// Runtime address minus link-time address.
  let bias: UInt64
  /// Functions whose sweep stopped before their end.
  public let unswept: Int
  /// Link-time addresses that are entered as functions: direct call targets, addresses the code
  /// takes (RIP-relative operands), addresses the data holds (`R_X86_64_RELATIVE` addends), the
  /// entry point; sorted. (A `.cold` part is only ever jumped to.)
  let functionStarts: [UInt64]
  /// The object's call frames (FDE ranges) that no function symbol covers.
  let unnamedFrames: [(address: UInt64, size: UInt64)]
  /// Link-time start and end of each function range whose sweep reached its end, by start.
  let swept: [(start: UInt64, end: UInt64)]
  /// How each function of `swept` (parallel to it) would be relocated, as the sweep decided it
  /// from the file (`DecidedPrologue`); empty only when read from a file that kept none.
  let prologues: [DecidedPrologue]
  /// Link-time entries of the function symbols no call frame (FDE) describes, in an object that
  /// has call frames; sorted. Compilers describe every function they emit; what they do not is
  /// hand-written or generated code (node's 2,182 V8 builtins), which may be entered, left and
  /// walked by its own conventions (V8's frames read their return addresses): not traced.
  let unframed: [UInt64]
  /// Where the last `sweptWhole` and `first(in:)` answers were: functions are decided in address
  /// order, so the next answer is a few elements on (two binary searches per function were a
  /// tenth of deciding 50,000). Only a guess: any thread may move them; each search checks it.
  private let sweptHint = Atomic<Int>(0)
  private let targetHint = Atomic<Int>(0)

  /// The same entry points with hints of their own, for a thread deciding functions beside
  /// another (`Halves`): sharing the hints, each thread's searches moved them away from the
  /// other's, and their stores bounced the line between the cores.
  func withOwnHints() -> EntryPoints { EntryPoints(sharing: self) }

  private init(sharing other: EntryPoints) {
    targets = other.targets
    bias = other.bias
    unswept = other.unswept
    functionStarts = other.functionStarts
    unnamedFrames = other.unnamedFrames
    swept = other.swept
    prologues = other.prologues
    unframed = other.unframed
  }

  public init(file: ELFFile, bias: UInt64) {
    // Sorted by address (`functionSymbols`), read once for the sweep and for the frames they cover.
    let symbols = (try? file.functionSymbols()) ?? []
    var ranges: [(start: UInt64, size: UInt64)] = symbols.map { ($0.value, $0.size) }
    let frames = file.frameDescriptions()
    ranges += frames.descriptions.map { ($0.start, $0.size) }
    ranges.sort { $0.start < $1.start }
    // Only addresses inside the functions' span can start one: the many that point into data
    // (most RIP-relative operands, most relocated words) are not kept (sorting them was a
    // quarter of this sweep for bash).
    let low = ranges.first?.start ?? 0
    let high = ranges.reduce(low) { max($0, $1.start &+ $1.size) }
    let span = low..<max(low, high)
    var targets: [UInt64] = []
    var starts: [UInt64] = (file.relativeAddends() + [file.entry]).filter(span.contains)
    var unswept = 0
    var swept: [(start: UInt64, end: UInt64)] = []
    var prologues: [DecidedPrologue] = []
    var previous: UInt64?
    for range in ranges where range.size > 0 && range.start != previous {
      previous = range.start
      guard range.size <= 1 << 24, let code = file.bytes(atAddress: range.start, count: Int(range.size)) else {
        continue
      }
      let complete = code.withUnsafeBytes { raw in
        var offset = 0
        while offset < raw.count {
          let rest = UnsafeRawBufferPointer(rebasing: raw[offset..<min(raw.count, offset + 15)])
          guard let instruction = X86Decoder.decode(rest, at: range.start + UInt64(offset)) else { return false }
          switch instruction.flow {
          case .jump(let target), .branch(let target): targets.append(target)
          case .call(let target):
            targets.append(target)
            if span.contains(target) { starts.append(target) }
          case .next, .end, .indirect: break
          }
          if let at = instruction.ripDisplacementOffset, offset + at + 4 <= raw.count {
            let displacement = Int32(bitPattern: raw.loadUnaligned(fromByteOffset: offset + at, as: UInt32.self))
            let address = range.start &+ UInt64(offset + instruction.length) &+ UInt64(bitPattern: Int64(displacement))
            if span.contains(address) { starts.append(address) }
          }
          offset += instruction.length
        }
        return true
      }
      if complete {
        swept.append((range.start, range.start &+ range.size))
        prologues.append(code.withUnsafeBytes { DecidedPrologue(code: $0, at: range.start) })
      } else {
        unswept += 1
      }
    }
    self.swept = swept
    for description in frames.descriptions {
      guard let lsda = description.lsda else { continue }
      targets += file.landingPads(lsda: lsda, functionStart: description.start) ?? []
    }
    targets.sort()
    var unique: [UInt64] = []
    unique.reserveCapacity(targets.count)
    for target in targets where unique.last != target { unique.append(target) }
    self.targets = unique
    self.prologues = DecidedPrologue.unentered(prologues, of: swept, targets: unique)
    self.bias = bias
    self.unswept = unswept
    starts.sort()
    functionStarts = starts
    let sized = symbols.filter { $0.size > 0 }
    unframed = Self.unframed(sized.map(\.value), frames: frames.descriptions, file: file)
    unnamedFrames = frames.descriptions.filter { frame in
      // Covered when a symbol's range overlaps the frame's.
      let index = sized.firstIndex(notBelow: frame.start + 1) { $0.value + $0.size }
      return !(index < sized.count && sized[index].value < frame.start + frame.size)
    }.map { ($0.start, $0.size) }
  }

  /// The entries of `functions` no frame describes, where that says the code is not a compiler's:
  /// gcc and clang describe every function they emit (unwind tables are on by default on
  /// x86-64), so in an object of theirs the functions without one come from elsewhere (node:
  /// 2,182 of 65,605, V8's builtins; hand-written assembly without CFI). swiftc leaves leaf
  /// functions without frames (half of a small program's), and code built without unwind tables
  /// has none: no conclusion there (an object with Swift metadata, or with half its functions or
  /// more undescribed, gets none).
  static func unframed(_ functions: [UInt64], frames: [ELFFile.FrameDescription], file: ELFFile) -> [UInt64] {
    guard !frames.isEmpty, !functions.isEmpty, !file.sections.contains(where: { $0.name.hasPrefix("swift5_") })
    else { return [] }
    let described = frames.map { (start: $0.start, end: $0.start &+ $0.size) }.sorted { $0.start < $1.start }
    let lacking = functions.filter { lacksFrame($0, in: described) }
    return lacking.count * 2 < functions.count ? lacking : []
  }

  /// Whether no frame of `frames` (sorted by start) covers `entry` or starts within its first 16
  /// bytes (some hand-written functions' frames begin after an `endbr64` or a first instruction).
  static func lacksFrame(_ entry: UInt64, in frames: [(start: UInt64, end: UInt64)]) -> Bool {
    let next = frames.firstIndex(notBelow: entry &+ 1) { $0.start }
    if next < frames.count, frames[next].start < entry &+ 16 { return false }
    // The frames that start before it (a few: frames do not nest, but a zero-sized one may sit
    // between a function's frame and a later entry inside it).
    return !frames[max(0, next - 4)..<next].contains { $0.end > entry }
  }

  /// Whether the function at `entry` (runtime) is one no call frame describes (`unframed`).
  func lacksFrame(_ entry: UInt64) -> Bool {
    let start = entry &- bias
    let index = unframed.firstIndex(notBelow: start) { $0 }
    return index < unframed.count && unframed[index] == start
  }

  /// The functions of a stripped object that no symbol names: its call frames whose start is
  /// entered as a function (`functionStarts`), link-time address and size. A frame only jumped
  /// to (a `.cold` part) or only reached by tail calls is left out.
  public var unnamedFunctions: [(address: UInt64, size: UInt64)] {
    unnamedFrames.filter { frame in
      let index = functionStarts.firstIndex(notBelow: frame.address) { $0 }
      return index < functionStarts.count && functionStarts[index] == frame.address
    }
  }

  /// Whether the sweep went through the whole function of `size` bytes at `entry` (runtime):
  /// then every direct branch of it is in `targets`, and `first(in:)` answers for its own code
  /// too (a second sweep of each function was a fifth of a relocating start).
  func sweptWhole(_ entry: UInt64, size: Int) -> Bool { sweptIndex(entry, size: size) != nil }

  /// The index in `swept` of the function of `size` bytes at `entry` (runtime) when its sweep
  /// went through all of it (`sweptWhole`), else nil.
  private func sweptIndex(_ entry: UInt64, size: Int) -> Int? {
    let start = entry &- bias
    let index = swept.firstIndex(notBelow: start, by: { $0.start }, from: sweptHint.load(ordering: .relaxed))
    sweptHint.store(index, ordering: .relaxed)
    guard index < swept.count, swept[index].start == start, swept[index].end >= start &+ UInt64(size) else {
      return nil
    }
    return index
  }

  /// The relocated site of the function of `size` bytes at `entry` (runtime) as the sweep
  /// decided it (`prologues`), when its code in memory still begins with the bytes the decision
  /// read; else nil (decide it from memory: `PatchSite.relocated`). Deciding 50,000 functions
  /// again at each attach decoded what the sweep had decoded already.
  func decidedSite(_ entry: UInt64, size: Int) -> PatchSite? {
    // Swept through `size` bytes: every branch of its own code is among `targets` (as
    // `sweptWhole` says for `PatchSite.relocated`).
    guard let index = sweptIndex(entry, size: size), index < prologues.count else { return nil }
    return prologues[index].site(at: entry, size: size)
  }

  /// The first target in `range` (runtime addresses), if any.
  public func first(in range: Range<UInt64>) -> UInt64? {
    let index = targets.firstIndex(
      notBelow: range.lowerBound &- bias, by: { $0 }, from: targetHint.load(ordering: .relaxed))
    targetHint.store(index, ordering: .relaxed)
    guard index < targets.count, targets[index] &+ bias < range.upperBound else { return nil }
    return targets[index] &+ bias
  }

  /// Entry points of loaded objects, built once per object (path and bias) on first use.
  static let cache = Mutex<[String: EntryPoints]>([:])

  /// Where entry points outlive the process, by object path (nil: nowhere). The agent keeps
  /// them beside a trace's symbol files, so that every later process of the same program skips
  /// the sweep (decoding all of bash's code took ~8 ms of each traced bash's start). `load`
  /// returns what `store` was given for the same file, or nil.
  nonisolated(unsafe) public static var persistence:
    (load: @Sendable (String) -> [UInt8]?, store: @Sendable (String, [UInt8]) -> Void)?

  static func of(path: String, bias: UInt64) -> EntryPoints? {
    // (`persisted` answers from the cache first.)
    if let known = persisted(path: path, bias: bias) { return known }
    guard let file = try? ELFFile(path: path) else { return nil }
    return of(file: file, path: path, bias: bias)
  }

  /// The entry points `persistence` kept for the object at `path` (now cached here too), or nil.
  static func persisted(path: String, bias: UInt64) -> EntryPoints? {
    let key = "\(bias) \(path)"
    if let known = cache.withLock({ $0[key] }) { return known }
    guard let bytes = persistence?.load(path), let points = EntryPoints(encoded: bytes, bias: bias) else { return nil }
    cache.withLock { $0[key] = points }
    return points
  }

  /// `of(path:bias:)` with the object's file already read.
  static func of(file: ELFFile, path: String, bias: UInt64) -> EntryPoints {
    let key = "\(bias) \(path)"
    if let known = cache.withLock({ $0[key] }) { return known }
    let points = EntryPoints(file: file, bias: bias)
    cache.withLock { $0[key] = points }
    persistence?.store(path, points.encoded)
    return points
  }

  // MARK: - Kept in a file

  /// "TRENTRY3", seven counts (targets, function starts, unnamed frames, swept ranges, unframed
  /// functions, unswept, decided prologues: 0 or as many as swept ranges), then the arrays'
  /// words, little-endian: link-time addresses, so any bias reads them; each decided prologue
  /// three words (`DecidedPrologue.words`).
  var encoded: [UInt8] {
    var words: [UInt64] = [Self.magic, UInt64(targets.count), UInt64(functionStarts.count)]
    words += [UInt64(unnamedFrames.count), UInt64(swept.count), UInt64(unframed.count), UInt64(unswept)]
    words.append(UInt64(prologues.count))
    words += targets + functionStarts
    for frame in unnamedFrames { words += [frame.address, frame.size] }
    for range in swept { words += [range.start, range.end] }
    words += unframed
    for prologue in prologues { words += prologue.words }
    return words.withUnsafeBytes { Array($0) }
  }

  static let magic: UInt64 = 0x3359_5254_4e45_5254  // "TRENTRY3"

  /// Entry points from `encoded`'s bytes; nil when they are not whole (a corrupt or foreign
  /// file is swept again, never trusted).
  init?(encoded bytes: [UInt8], bias: UInt64) {
    guard bytes.count >= 64, bytes.count % 8 == 0 else { return nil }
    // Each array copied once, straight from the bytes (x86-64 is little-endian, as the file is:
    // word by word was half of reading it, and a copy of the whole as words another third).
    let decoded = bytes.withUnsafeBytes { raw -> Decoded? in
      func word(_ index: Int) -> UInt64 { raw.loadUnaligned(fromByteOffset: 8 * index, as: UInt64.self) }
      guard word(0) == Self.magic else { return nil }
      let counts = (1...7).map { Int(clamping: word($0)) }
      let (targetCount, startCount, frameCount, sweptCount) = (counts[0], counts[1], counts[2], counts[3])
      let (unframedCount, prologueCount) = (counts[4], counts[6])
      guard targetCount < 1 << 28, startCount < 1 << 28, frameCount < 1 << 28, sweptCount < 1 << 28,
        unframedCount < 1 << 28, prologueCount == 0 || prologueCount == sweptCount,
        raw.count / 8
          == 8 + targetCount + startCount + 2 * frameCount + 2 * sweptCount + unframedCount + 3 * prologueCount
      else { return nil }
      var at = 8
      func take(_ count: Int) -> [UInt64] {
        defer { at += count }
        return [UInt64](unsafeUninitializedCapacity: count) { buffer, initialized in
          UnsafeMutableRawBufferPointer(buffer).copyMemory(
            from: UnsafeRawBufferPointer(rebasing: raw[(8 * at)..<(8 * (at + count))]))
          initialized = count
        }
      }
      func takePairs(_ count: Int) -> [(UInt64, UInt64)] {
        defer { at += 2 * count }
        return (0..<count).map { (word(at + 2 * $0), word(at + 2 * $0 + 1)) }
      }
      let (targets, starts, frames) = (take(targetCount), take(startCount), takePairs(frameCount))
      let (swept, unframed) = (takePairs(sweptCount), take(unframedCount))
      var prologues: [DecidedPrologue] = []
      prologues.reserveCapacity(prologueCount)
      for _ in 0..<prologueCount {
        guard let prologue = DecidedPrologue(words: (word(at), word(at + 1), word(at + 2))) else { return nil }
        prologues.append(prologue)
        at += 3
      }
      return Decoded(
        targets: targets, starts: starts, frames: frames, swept: swept, unframed: unframed, prologues: prologues,
        unswept: counts[5])
    }
    guard let decoded else { return nil }
    // Sorted, as the searches need them.
    let (targets, starts, unframed) = (decoded.targets, decoded.starts, decoded.unframed)
    guard zip(targets, targets.dropFirst()).allSatisfy({ $0 < $1 }),
      zip(starts, starts.dropFirst()).allSatisfy({ $0 <= $1 }),
      zip(unframed, unframed.dropFirst()).allSatisfy({ $0 <= $1 }),
      zip(decoded.swept, decoded.swept.dropFirst()).allSatisfy({ $0.0 <= $1.0 })
    else { return nil }
    self.unframed = unframed
    self.targets = targets
    self.functionStarts = starts
    self.unnamedFrames = decoded.frames.map { (address: $0.0, size: $0.1) }
    self.swept = decoded.swept.map { (start: $0.0, end: $0.1) }
    self.prologues = decoded.prologues
    self.unswept = decoded.unswept
    self.bias = bias
  }

  /// What `init?(encoded:bias:)` reads, before it checks the order.
  private struct Decoded {
    let targets: [UInt64]
    let starts: [UInt64]
    let frames: [(UInt64, UInt64)]
    let swept: [(UInt64, UInt64)]
    let unframed: [UInt64]
    let prologues: [DecidedPrologue]
    let unswept: Int
  }
}
