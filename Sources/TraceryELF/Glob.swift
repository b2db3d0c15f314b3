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
  /// The first token's byte when it is a literal one: most names fail on it, before the
  /// matcher runs (a glob is matched against every function of a process).
  private let firstByte: UInt8?

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
    if case .byte(let byte) = tokens.first { firstByte = byte } else { firstByte = nil }
  }

  /// Whether `name` matches the whole pattern.
  public func matches(_ name: String) -> Bool {
    var name = name
    return name.withUTF8 { matches(utf8: $0) }
  }

  /// Iterative matcher with one backtrack point (the last `*`): O(pattern × name) worst case.
  public func matches(utf8 name: UnsafeBufferPointer<UInt8>) -> Bool {
    if let firstByte, name.first != firstByte { return false }
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
