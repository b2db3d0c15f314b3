/// What to show: the read-time filters of uftrace (`-F`, `-N`, `-D`, `-t`).
public struct CallFilter: Sendable {
  /// Show only these functions and what they call (-F).
  public var only: [NameMatcher] = []
  /// Hide these functions and what they call (-N).
  public var hide: [NameMatcher] = []
  /// Show calls at most this deep below the shown root (-D; 1 = the roots only).
  public var depth: Int?
  /// Hide calls shorter than this many nanoseconds (-t), with their callees.
  public var threshold: Double?

  public init() {}

  public var isEmpty: Bool { only.isEmpty && hide.isEmpty && depth == nil && threshold == nil }
}

/// A malformed pattern or option (not a problem of the trace).
public struct PatternError: Error, Equatable, CustomStringConvertible {
  public let description: String
  public init(_ description: String) { self.description = description }
}

/// A function-name pattern, matched as uftrace matches `-F`/`-N` patterns: a pattern with none
/// of the characters `.?*+-^$|()[]{}` names a function exactly; one with any of them is a
/// regular expression searched for in the name (`dist*` finds `distance2`; `^main$` is exact).
/// With `--match glob`, a glob over the whole name (`*`, `?`).
public struct NameMatcher: @unchecked Sendable {
  // @unchecked: Regex is immutable once built.
  private let regex: Regex<AnyRegexOutput>?
  private let glob: [Character]?
  public let pattern: String

  public enum Kind: String, Sendable { case regex, glob }

  /// uftrace's REGEX_CHARS: a pattern with one of these is a regular expression.
  static let regexCharacters = Set(".?*+-^$|()[]{}")

  public init(_ pattern: String, kind: Kind) throws(PatternError) {
    self.pattern = pattern
    switch kind {
    case .regex where !pattern.contains(where: Self.regexCharacters.contains):
      regex = nil
      glob = nil
    case .regex:
      do { regex = try Regex(pattern) } catch {
        throw PatternError("invalid regular expression '\(pattern)': \(error)")
      }
      glob = nil
    case .glob:
      regex = nil
      glob = Array(pattern)
    }
  }

  public func matches(_ name: String) -> Bool {
    if let regex { return (try? regex.firstMatch(in: name)) != nil }
    guard let glob else { return name == pattern }
    return Self.globMatch(glob[...], Array(name)[...])
  }

  /// Whether the pattern names the function `symbol` by any of its names (`Demangler.forms`).
  public func matchesFunction(_ symbol: String) -> Bool {
    if matches(symbol) { return true }
    return Demangler.forms(symbol).dropFirst().contains(where: matches)
  }

  /// `*` (any run) and `?` (any one character); iterative with one backtrack point (the last
  /// `*`), so O(pattern × name) whatever the number of stars (the recursive form was exponential).
  private static func globMatch(_ pattern: ArraySlice<Character>, _ text: ArraySlice<Character>) -> Bool {
    let pattern = Array(pattern)
    let text = Array(text)
    var p = 0
    var n = 0
    var star = -1
    var starText = 0
    while n < text.count {
      if p < pattern.count {
        if pattern[p] == "*" {
          star = p
          starText = n
          p += 1
          continue
        }
        if pattern[p] == "?" || pattern[p] == text[n] {
          p += 1
          n += 1
          continue
        }
      }
      guard star >= 0 else { return false }
      p = star + 1
      starText += 1
      n = starText
    }
    while p < pattern.count, pattern[p] == "*" { p += 1 }
    return p == pattern.count
  }
}
