/// A shell-style pattern over function names: `*` (any run), `?` (any one byte), `[abc]`,
/// `[a-z]`, `[!abc]` / `[^abc]` (byte classes), and `\x` for a literal `x`. Compiled once, matched
/// against the UTF-8 bytes of each name without allocating.
public struct Glob: Sendable, Equatable {
  public enum ParseError: Error, Equatable, CustomStringConvertible {
    case unterminatedClass(pattern: String)
    case trailingBackslash(pattern: String)
    case empty

    public var description: String {
      switch self {
      case .unterminatedClass(let pattern): return "glob '\(pattern)': '[' without a closing ']'"
      case .trailingBackslash(let pattern): return "glob '\(pattern)': ends with a lone '\\'"
      case .empty: return "empty glob"
      }
    }
  }

  enum Token: Sendable, Equatable {
    case byte(UInt8)
    case any
    case star
    /// A 256-bit membership set, negation already applied.
    case set(SIMD4<UInt64>)
  }

  public let pattern: String
  let tokens: [Token]
  /// The literal bytes the pattern starts and ends with (before its first wildcard, after its
  /// last): most names fail on them before the matcher runs, and a pattern that is one `*`
  /// between them (`tr_p*`, `*.cold`) needs no matcher (a glob is matched against every function
  /// of a process: the matcher was a tenth of attaching to 50,000 functions by a prefix).
  private let prefix: [UInt8]
  private let suffix: [UInt8]
  private let starBetween: Bool

  /// The literal name when the pattern has no wildcard (then a hash lookup replaces the scan).
  public var literal: String? {
    var bytes: [UInt8] = []
    for token in tokens {
      guard case .byte(let byte) = token else { return nil }
      bytes.append(byte)
    }
    return String(decoding: bytes, as: UTF8.self)
  }

  public init(_ pattern: String) throws(ParseError) {
    guard !pattern.isEmpty else { throw .empty }
    self.pattern = pattern
    let bytes = Array(pattern.utf8)
    var tokens: [Token] = []
    var at = 0
    while at < bytes.count {
      let byte = bytes[at]
      switch byte {
      case UInt8(ascii: "*"):
        if tokens.last != .star { tokens.append(.star) }
        at += 1
      case UInt8(ascii: "?"):
        tokens.append(.any)
        at += 1
      case UInt8(ascii: "\\"):
        guard at + 1 < bytes.count else { throw .trailingBackslash(pattern: pattern) }
        tokens.append(.byte(bytes[at + 1]))
        at += 2
      case UInt8(ascii: "["):
        var cursor = at + 1
        var negate = false
        if cursor < bytes.count, bytes[cursor] == UInt8(ascii: "!") || bytes[cursor] == UInt8(ascii: "^") {
          negate = true
          cursor += 1
        }
        var set = SIMD4<UInt64>(repeating: 0)
        var first = true
        var closed = false
        while cursor < bytes.count {
          let member = bytes[cursor]
          if member == UInt8(ascii: "]") && !first {
            closed = true
            break
          }
          first = false
          var high = member
          if cursor + 2 < bytes.count, bytes[cursor + 1] == UInt8(ascii: "-"), bytes[cursor + 2] != UInt8(ascii: "]") {
            high = bytes[cursor + 2]
            cursor += 2
          }
          if member <= high {
            for value in member...high { set[Int(value >> 6)] |= 1 << UInt64(value & 63) }
          }
          cursor += 1
        }
        guard closed else { throw .unterminatedClass(pattern: pattern) }
        if negate { set = ~set }
        tokens.append(.set(set))
        at = cursor + 1
      default:
        tokens.append(.byte(byte))
        at += 1
      }
    }
    self.tokens = tokens
    func literalRun(_ tokens: some Sequence<Token>) -> [UInt8] {
      var run: [UInt8] = []
      for token in tokens {
        guard case .byte(let byte) = token else { break }
        run.append(byte)
      }
      return run
    }
    prefix = literalRun(tokens)
    // (A pattern without wildcards is all prefix.)
    suffix = prefix.count == tokens.count ? [] : literalRun(tokens.reversed()).reversed()
    starBetween = tokens.count == prefix.count + 1 + suffix.count && tokens[prefix.count] == .star
  }

  /// A name's first 8 bytes packed little-endian, zero past its end: what `head` is compared
  /// with (a symbol table keeps one per function, `SymbolTable.functions(matching:)`).
  public static func head(of name: UnsafeBufferPointer<UInt8>) -> UInt64 {
    var head: UInt64 = 0
    for index in 0..<min(8, name.count) { head |= UInt64(name[index]) << (8 * UInt64(index)) }
    return head
  }

  /// What every matching name's `head(of:)` holds under `mask` (the pattern's first literal
  /// bytes, up to 8; mask 0 when it starts with a wildcard), and whether that decides the match
  /// (the pattern is those bytes and one `*`: `tr_p*`).
  public var head: (value: UInt64, mask: UInt64, decides: Bool) {
    // (A NUL byte in the pattern would match a short name's zero fill: no filter then.)
    guard !prefix.contains(0) else { return (0, 0, false) }
    let count = min(8, prefix.count)
    let value = prefix.withUnsafeBufferPointer { Self.head(of: UnsafeBufferPointer(rebasing: $0[..<count])) }
    let mask: UInt64 = count == 8 ? .max : (1 << (8 * UInt64(count))) - 1
    return (value, mask, starBetween && suffix.isEmpty && prefix.count <= 8)
  }

  /// Whether `name` matches the whole pattern.
  public func matches(_ name: String) -> Bool {
    var name = name
    return name.withUTF8 { matches(utf8: $0) }
  }

  /// Iterative matcher with one backtrack point (the last `*`): O(pattern × name) worst case.
  public func matches(utf8 name: UnsafeBufferPointer<UInt8>) -> Bool {
    guard name.count >= prefix.count + suffix.count else { return false }
    for index in prefix.indices where name[index] != prefix[index] { return false }
    let end = name.count - suffix.count
    for index in suffix.indices where name[end + index] != suffix[index] { return false }
    if starBetween { return true }
    var p = 0
    var n = 0
    var starToken = -1
    var starName = 0
    while n < name.count {
      if p < tokens.count {
        switch tokens[p] {
        case .star:
          starToken = p
          starName = n
          p += 1
          continue
        case .any:
          p += 1
          n += 1
          continue
        case .byte(let byte) where byte == name[n]:
          p += 1
          n += 1
          continue
        case .set(let set) where set[Int(name[n] >> 6)] & (1 << UInt64(name[n] & 63)) != 0:
          p += 1
          n += 1
          continue
        default:
          break
        }
      }
      guard starToken >= 0 else { return false }
      p = starToken + 1
      starName += 1
      n = starName
    }
    while p < tokens.count, tokens[p] == .star { p += 1 }
    return p == tokens.count
  }
}
