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
public struct EntryPoints: Sendable {
  /// Link-time addresses, sorted, without repeats.
  let targets: [UInt64]
  /// Runtime address minus link-time address.
  let bias: UInt64
  /// Functions whose sweep stopped before their end.
  public let unswept: Int

  public init(file: ELFFile, bias: UInt64) {
    var ranges: [(start: UInt64, size: UInt64)] = []
    if let symbols = try? file.functionSymbols() { ranges += symbols.map { ($0.value, $0.size) } }
    let frames = file.frameDescriptions()
    ranges += frames.descriptions.map { ($0.start, $0.size) }
    ranges.sort { $0.start < $1.start }
    var targets: [UInt64] = []
    var unswept = 0
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
          case .jump(let target), .branch(let target), .call(let target): targets.append(target)
          case .next, .end, .indirect: break
          }
          offset += instruction.length
        }
        return true
      }
      if !complete { unswept += 1 }
    }
    for description in frames.descriptions {
      guard let lsda = description.lsda else { continue }
      targets += file.landingPads(lsda: lsda, functionStart: description.start) ?? []
    }
    targets.sort()
    var unique: [UInt64] = []
    unique.reserveCapacity(targets.count)
    for target in targets where unique.last != target { unique.append(target) }
    self.targets = unique
    self.bias = bias
    self.unswept = unswept
  }

  /// The first target in `range` (runtime addresses), if any.
  public func first(in range: Range<UInt64>) -> UInt64? {
    let low = range.lowerBound &- bias
    var lower = 0
    var upper = targets.count
    while lower < upper {
      let middle = (lower + upper) / 2
      if targets[middle] < low { lower = middle + 1 } else { upper = middle }
    }
    guard lower < targets.count, targets[lower] &+ bias < range.upperBound else { return nil }
    return targets[lower] &+ bias
  }

  /// Entry points of loaded objects, built once per object (path and bias) on first use.
  static let cache = Mutex<[String: EntryPoints]>([:])

  static func of(path: String, bias: UInt64) -> EntryPoints? {
    let key = "\(bias) \(path)"
    if let known = cache.withLock({ $0[key] }) { return known }
    guard let file = try? ELFFile(path: path) else { return nil }
    let points = EntryPoints(file: file, bias: bias)
    cache.withLock { $0[key] = points }
    return points
  }
}
