/// One call rebuilt from a thread's entry and exit events.
public struct Call: Sendable, Equatable {
  /// The demangled name in full: what filters match (`NameMatcher.matchesFunction`).
  public var name: String
  /// The name as the reader shows it (`Demangler.Style`); the full name unless set.
  public var label: String
  public let depth: Int
  /// Nanoseconds since the first traced process of the recording started.
  public let start: Double
  public var end: Double
  /// The exit was recorded. False for calls left by `longjmp` or an exception, or still running
  /// when the recording ended (a crash, `kill -9`): `end` is then the last time seen.
  public var complete: Bool
  /// Index of the parent call, if any.
  public let parent: Int?
  public var children: [Int] = []
  /// Values recorded with `-A` (arguments) and `-R` (the return value).
  public var arguments: [RecordedValue] = []
  public var returnValues: [RecordedValue] = []

  /// `name(arguments)` as uftrace shows it; recorded arguments take the place of a C++ name's
  /// parameter types (`middle(1)` rather than `middle(int)(1)`).
  public var signature: String {
    guard !arguments.isEmpty else { return label + "()" }
    return "\(Demangler.withoutParameters(label))(\(arguments.map(\.text).joined(separator: ", ")))"
  }
  /// ` = value` when the return value was recorded.
  public var returnSuffix: String {
    returnValues.isEmpty ? "" : " = " + returnValues.map(\.text).joined(separator: ", ")
  }

  public var duration: Double { end - start }
}

/// The calls of one thread, in entry order (a pre-order walk of its call trees).
public struct ThreadCalls: Sendable {
  public let session: String
  public let pid: Int32
  public let tid: Int32
  public var calls: [Call]
  public let dropped: UInt64
  /// The thread's name when it started recording (empty when unknown).
  public var name = ""
}

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

  private static func globMatch(_ pattern: ArraySlice<Character>, _ text: ArraySlice<Character>) -> Bool {
    guard let first = pattern.first else { return text.isEmpty }
    switch first {
    case "*":
      var rest = text
      while true {
        if globMatch(pattern.dropFirst(), rest) { return true }
        guard !rest.isEmpty else { return false }
        rest = rest.dropFirst()
      }
    case "?": return !text.isEmpty && globMatch(pattern.dropFirst(), text.dropFirst())
    default: return text.first == first && globMatch(pattern.dropFirst(), text.dropFirst())
    }
  }
}

extension Trace {
  /// Every thread's calls, named by `symbolize(session, site)`.
  public func calls(symbolize: (String, UInt64) -> String) -> [ThreadCalls] {
    // One time base for every process (fork children, exec'd images): the earliest start.
    let origin = processes.map(\.startRealtimeNanoseconds).min() ?? 0
    let clocks = Dictionary(
      processes.map {
        ($0.session, ($0.ticksPerNanosecond, $0.startTicks, Double($0.startRealtimeNanoseconds - origin)))
      }
    ) { a, _ in a }
    // A thread whose process file is missing: another process's clock (one machine, one counter).
    let fallback = processes.first.map { ($0.ticksPerNanosecond, $0.startTicks, 0.0) } ?? (1, 0, 0)
    return threads.map { thread in
      let (rate, startTicks, offset) = clocks[thread.session] ?? fallback
      func time(_ ticks: UInt64) -> Double { offset + (Double(ticks) - Double(startTicks)) / rate }
      var calls: [Call] = []
      var open: [Int] = []
      // The depth of open[0]: 0, except in a fork child, whose first calls nest in the frames it
      // inherited from its parent (they are shown at that depth, under them, as uftrace does).
      var base = 0
      var names: [UInt64: String] = [:]
      func close(_ index: Int, at end: Double, complete: Bool) {
        calls[index].end = max(end, calls[index].start)
        calls[index].complete = complete
      }
      for event in thread.events {
        let now = time(event.timestamp)
        switch event.kind {
        case .entry:
          // Calls as deep or deeper than this entry ended without an exit (longjmp, exception).
          while base + open.count > event.depth, let last = open.popLast() { close(last, at: now, complete: false) }
          if open.isEmpty { base = event.depth }
          let name =
            names[event.site]
            ?? {
              let name = symbolize(thread.session, event.site)
              names[event.site] = name
              return name
            }()
          let parent = open.last
          var call = Call(
            name: name, label: name, depth: base + open.count, start: now, end: now, complete: false, parent: parent)
          call.arguments = event.values
          calls.append(call)
          if let parent { calls[parent].children.append(calls.count - 1) }
          open.append(calls.count - 1)
        case .exit:
          // The call this exit ends is at its depth; deeper ones were left without one. An exit
          // above the first open call ends a frame this file never saw enter (a fork child's).
          guard !open.isEmpty else { continue }
          let target = min(event.depth - base, open.count - 1)
          if target < 0 {
            while let last = open.popLast() { close(last, at: now, complete: false) }
            continue
          }
          while open.count > target + 1, let last = open.popLast() { close(last, at: now, complete: false) }
          if let last = open.popLast() {
            close(last, at: now, complete: true)
            calls[last].returnValues = event.values
          }
        }
      }
      let lastTime = thread.events.last.map { time($0.timestamp) } ?? 0
      for index in open.reversed() { close(index, at: lastTime, complete: false) }
      return ThreadCalls(
        session: thread.session, pid: thread.pid, tid: thread.tid, calls: calls, dropped: thread.dropped,
        name: thread.name)
    }
  }
}

extension ThreadCalls {
  /// Indices of the calls to show under `filter`, each with the depth to show it at.
  public func visible(_ filter: CallFilter) -> [(index: Int, depth: Int)] {
    var result: [(index: Int, depth: Int)] = []
    // Patterns are tried once per distinct name (a name can be tried three ways, see
    // `NameMatcher.matchesFunction`), not once per call.
    var hiddenNames: [String: Bool] = [:]
    var chosenNames: [String: Bool] = [:]
    func named(_ name: String, by matchers: [NameMatcher], remembering cache: inout [String: Bool]) -> Bool {
      if let known = cache[name] { return known }
      let found = matchers.contains { $0.matchesFunction(name) }
      cache[name] = found
      return found
    }
    // `shown`: the depth it is shown at and the depth of its shown root (-D counts from there).
    func walk(_ index: Int, shown: (depth: Int, root: Int)?) {
      let call = calls[index]
      if !filter.hide.isEmpty && named(call.name, by: filter.hide, remembering: &hiddenNames) { return }
      if let threshold = filter.threshold, call.complete, call.duration < threshold { return }
      var place = shown
      if place == nil {
        // Unfiltered, a root keeps its depth (a fork child's calls nest in its parent's); a call
        // -F chose starts at the left.
        if filter.only.isEmpty {
          place = (call.depth, call.depth)
        } else if named(call.name, by: filter.only, remembering: &chosenNames) {
          place = (0, 0)
        }
      }
      if let place {
        if let limit = filter.depth, place.depth - place.root >= limit { return }
        result.append((index, place.depth))
      }
      for child in call.children { walk(child, shown: place.map { ($0.depth + 1, $0.root) }) }
    }
    for (index, call) in calls.enumerated() where call.parent == nil { walk(index, shown: nil) }
    return result
  }
}
