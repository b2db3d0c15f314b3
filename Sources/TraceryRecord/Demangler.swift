#if canImport(Glibc)
  import Glibc
#endif

/// Readable names for C++ (`__cxa_demangle`) and Swift (`swift_demangle`) symbols, through the
/// runtimes' own demanglers when this process has them loaded (looked up with dlsym, so a C
/// program pays nothing). Other names come back unchanged.
public enum Demangler {
  private typealias CxxDemangle =
    @convention(c) (
      UnsafePointer<CChar>, UnsafeMutablePointer<CChar>?, UnsafeMutablePointer<Int>?,
      UnsafeMutablePointer<Int32>?
    ) -> UnsafeMutablePointer<CChar>?
  private typealias SwiftDemangle =
    @convention(c) (UnsafePointer<CChar>, Int, UnsafeMutablePointer<CChar>?, UnsafeMutablePointer<Int>?, UInt32) ->
    UnsafeMutablePointer<CChar>?

  private static let cxx: CxxDemangle? = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__cxa_demangle").map {
    unsafeBitCast($0, to: CxxDemangle.self)
  }
  private static let swift: SwiftDemangle? = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "swift_demangle").map {
    unsafeBitCast($0, to: SwiftDemangle.self)
  }

  public static func demangle(_ name: String) -> String {
    if let called = calledThroughPLT(name) { return demangle(called) + plt }
    if name.hasPrefix("_Z"), let cxx {
      var status: Int32 = 0
      if let result = cxx(name, nil, nil, &status), status == 0 {
        defer { free(result) }
        return String(cString: result)
      }
    }
    if name.hasPrefix("$s") || name.hasPrefix("_$s") || name.hasPrefix("$S"), let swift {
      if let result = swift(name, name.utf8.count, nil, nil, 0) {
        defer { free(result) }
        return String(cString: result)
      }
    }
    return name
  }

  /// A library call's name (`NAME@plt`, see `LibraryCalls`) is its function's, shown the same way.
  static let plt = "@plt"

  /// The function a library call's name names (mangled or already demangled).
  private static func calledThroughPLT(_ name: String) -> String? {
    name.hasSuffix(plt) ? String(name.dropLast(plt.count)) : nil
  }

  /// How reading commands show C++ and Swift names (uftrace's `--demangle`).
  public enum Style: String, Sendable, CaseIterable {
    /// C++ names without parameters, template arguments or qualifiers: `ns::Stack::push`
    /// (uftrace's default); Rust names without their hash; Swift names in full.
    case simple
    /// The whole demangled name: `ns::Stack<int>::push(int const&)`.
    case full
    /// The symbol as the object file has it: `_ZN2ns5StackIiE4pushERKi`.
    case no
  }

  /// Every name a user may call the function `symbol` by: the symbol, its demangled name, that
  /// name without its parameter list (`ns::parse` for `ns::parse(char const*) const`), and its
  /// simple form (`ns::Stack::push` for `ns::Stack<int>::push(int const&)`); each once, in that
  /// order. Patterns (`-F`, `-N`, `-A`, `-R`, `--patch`, `list --match`) match any of them.
  public static func forms(_ symbol: String) -> [String] {
    if let called = calledThroughPLT(symbol) { return forms(called).map { $0 + plt } }
    var result = [symbol]
    let demangled = demangle(symbol)
    if demangled != symbol { result.append(demangled) }
    let hashless = withoutRustHash(demangled)
    if hashless != demangled { result.append(hashless) }
    // Also for a name given already demangled (what readers hold).
    guard demangled.contains("(") || demangled.contains("<") else { return result }
    let base = withoutParameters(demangled)
    if !result.contains(base) { result.append(base) }
    let simple = simplified(demangled)
    if !result.contains(simple) { result.append(simple) }
    return result
  }

  /// Whether `matches` accepts any of `symbol`'s forms: the symbol itself first, demangled only
  /// when it does not (demangling is what costs: --patch '*' over 37,000 Swift runtime symbols).
  public static func anyForm(of symbol: String, matches: (String) -> Bool) -> Bool {
    matches(symbol) || forms(symbol).dropFirst().contains(where: matches)
  }

  /// `symbol` as `style` shows it.
  public static func name(_ symbol: String, style: Style) -> String {
    if style != .no, let called = calledThroughPLT(symbol) { return name(called, style: style) + plt }
    switch style {
    case .no: return symbol
    case .full: return demangle(symbol)
    // Simple names are C++'s (what uftrace shows); a Swift name keeps its signature, whose
    // closures and `in` clauses the C++ rules would mangle.
    case .simple: return symbol.hasPrefix("_Z") ? simplified(withoutRustHash(demangle(symbol))) : demangle(symbol)
    }
  }

  /// A Rust function's legacy symbol demangles with its hash as the last component
  /// (`main::fib::h42af1a01a5cac11c`): the simple form leaves it out, as `rustfilt` does.
  static func withoutRustHash(_ name: String) -> String {
    let tail = name.utf8.suffix(19)
    guard tail.count == 19, tail.starts(with: "::h".utf8),
      tail.dropFirst(3).allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) })
    else { return name }
    return String(decoding: name.utf8.dropLast(19), as: UTF8.self)
  }

  /// A demangled name without its parameter list, template arguments and qualifiers. Operator
  /// names (`operator<<`, `operator()`), lambdas (`{lambda(int)#1}`) and `(anonymous namespace)`
  /// are kept as they are.
  public static func simplified(_ name: String) -> String {
    let characters = Array(name)
    var result = ""
    var angles = 0
    var braces = 0
    var index = 0
    var spaces: [Int] = []
    let operatorCharacters = Set("<>=!+-*/%^&|~[],")
    while index < characters.count {
      let character = characters[index]
      if braces > 0 {
        if character == "{" { braces += 1 } else if character == "}" { braces -= 1 }
        if angles == 0 { result.append(character) }
        index += 1
        continue
      }
      if angles == 0 && result.hasSuffix("operator") {
        if character == "(", index + 1 < characters.count, characters[index + 1] == ")" {
          result += "()"
          index += 2
          continue
        }
        if operatorCharacters.contains(character) {
          while index < characters.count, operatorCharacters.contains(characters[index]) {
            result.append(characters[index])
            index += 1
          }
          continue
        }
      }
      let anonymous = "(anonymous namespace)"
      if character == "(", angles == 0, characters.count - index >= anonymous.count,
        String(characters[index..<(index + anonymous.count)]) == anonymous
      {
        result += anonymous
        index += anonymous.count
        continue
      }
      switch character {
      case "<": angles += 1
      case ">" where angles > 0: angles -= 1
      case "{" where angles == 0:
        braces = 1
        result.append(character)
      case "(" where angles == 0 && !result.isEmpty:
        // A local entity's enclosing function (`f()::Local::g(int)`): its parameters go, the
        // name goes on.
        if let after = Self.localScope(characters, at: index) {
          index = after
          continue
        }
        return withoutReturnType(result)
      case " " where angles == 0:
        // A space before the name separates a function template's return type; after
        // `operator` it is part of the name (`operator new`, `operator int`).
        if !result.hasSuffix("operator") { spaces.append(result.count) }
        result.append(character)
      default: if angles == 0 { result.append(character) }
      }
      index += 1
    }
    return withoutReturnType(result)

    func withoutReturnType(_ text: String) -> String {
      let trimmed = text.hasSuffix(" ") ? String(text.dropLast()) : text
      guard let space = spaces.last(where: { $0 < trimmed.count }) else { return trimmed }
      return String(trimmed.dropFirst(space + 1))
    }
  }

  /// A demangled C++ name up to its parameter list: the first `(` outside template brackets
  /// that does not open an enclosing function's parameters (`f()::Local::g(int)` keeps `f()`).
  public static func withoutParameters(_ name: String) -> String {
    let characters = Array(name)
    var depth = 0
    var index = 0
    while index < characters.count {
      switch characters[index] {
      case "<": depth += 1
      case ">": depth -= 1
      case "(" where depth == 0 && index != 0:
        guard let after = localScope(characters, at: index) else { return String(characters[..<index]) }
        index = after
        continue
      default: break
      }
      index += 1
    }
    return name
  }

  /// When the parameter list opening at `open` belongs to a function that encloses a local
  /// entity (`)::` follows it, after any cv-qualifiers), the index where `::Local` begins.
  static func localScope(_ characters: [Character], at open: Int) -> Int? {
    var depth = 0
    var index = open
    while index < characters.count {
      if characters[index] == "(" { depth += 1 }
      if characters[index] == ")" {
        depth -= 1
        if depth == 0 { break }
      }
      index += 1
    }
    guard index < characters.count else { return nil }
    var rest = characters[(index + 1)...]
    for qualifier in [" const", " volatile", " &&", " &"] where rest.starts(with: qualifier) {
      rest = rest.dropFirst(qualifier.count)
    }
    return rest.starts(with: "::") ? rest.startIndex : nil
  }
}
