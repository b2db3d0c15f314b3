import Testing

@testable import TraceryRecord

/// `--demangle simple` names, as uftrace shows them: the demangled name without parameters,
/// template arguments, qualifiers or a template's return type; operator names, lambdas and
/// anonymous namespaces intact.
@Suite struct DemanglerTests {
  @Test(arguments: [
    ("after(int)", "after"),
    ("ns::Stack<int, std::allocator<int> >::push(int const&)", "ns::Stack::push"),
    ("ns::Stack<int>::size() const", "ns::Stack::size"),
    ("std::ostream& operator<< <char>(std::ostream&, Point const&)", "operator<<"),
    ("int ns::largest<int>(int, int)", "ns::largest"),
    ("Point::operator new(unsigned long)", "Point::operator new"),
    ("Point::operator()(int) const", "Point::operator()"),
    ("bool operator<(Point const&, Point const&)", "operator<"),
    ("main::{lambda(int)#1}::operator()(int) const", "main::{lambda(int)#1}::operator()"),
    ("(anonymous namespace)::helper(char const*)", "(anonymous namespace)::helper"),
    ("fib", "fib"),
    ("Plan::ComputeCriticalPath()::TopoSort::Visit(Edge*)", "Plan::ComputeCriticalPath::TopoSort::Visit"),
    ("f(int) const::Local::g() const", "f::Local::g"),
  ])
  func simplifiedNames(full: String, simple: String) {
    #expect(Demangler.simplified(full) == simple)
  }

  @Test func aLocalEntityKeepsItsEnclosingFunction() {
    let visit = "Plan::ComputeCriticalPath()::TopoSort::Visit(Edge*)"
    #expect(Demangler.withoutParameters(visit) == "Plan::ComputeCriticalPath()::TopoSort::Visit")
    #expect(Demangler.withoutParameters("Plan::ComputeCriticalPath()") == "Plan::ComputeCriticalPath")
    #expect(Demangler.simplified("Plan::ComputeCriticalPath()") == "Plan::ComputeCriticalPath")
  }

  /// uftrace's rule: a pattern without regular-expression characters names a function exactly;
  /// one with any is searched for in the name.
  @Test func patternsMatchAsUftracesDo() throws {
    #expect(try NameMatcher("dist*", kind: .regex).matches("distance2"))
    #expect(try NameMatcher("istan", kind: .regex).matches("distance2") == false)
    #expect(try NameMatcher("ista.", kind: .regex).matches("distance2"))
    #expect(try NameMatcher("main", kind: .regex).matches("main"))
    #expect(try NameMatcher("main", kind: .regex).matches("domain") == false)
    #expect(try NameMatcher("^main$", kind: .regex).matches("domain") == false)
    #expect(throws: PatternError.self) { try NameMatcher("(unclosed", kind: .regex) }
  }

  @Test func stylesOfAMangledName() {
    #expect(Demangler.name("_Z5afteri", style: .no) == "_Z5afteri")
    #expect(Demangler.name("main", style: .simple) == "main")
    // The test binary links the C++ runtime (the C++ fixtures): __cxa_demangle is there.
    #expect(Demangler.name("_Z5afteri", style: .full) == "after(int)")
    #expect(Demangler.name("_Z5afteri", style: .simple) == "after")
    // Swift names keep their signature (the Swift runtime's demangler is loaded here).
    #expect(Demangler.name("$s4main3fibyS2iF", style: .simple) == "main.fib(Swift.Int) -> Swift.Int")
    // Rust's legacy symbols: the simple form without the hash (as rustfilt), which patterns match.
    let rust = "_ZN4main3fib17h42af1a01a5cac11cE"
    #expect(Demangler.name(rust, style: .full) == "main::fib::h42af1a01a5cac11c")
    #expect(Demangler.name(rust, style: .simple) == "main::fib")
    #expect(Demangler.name(rust + "@plt", style: .simple) == "main::fib@plt")
    #expect(Demangler.forms(rust).contains("main::fib"))
    // A C++ name that merely ends in an h-word keeps it.
    #expect(Demangler.withoutRustHash("ns::h1234") == "ns::h1234")
  }

  /// Filters name a function in any of its forms, whatever the reader shows: the symbol, the full
  /// name, the name without parameters, or the simple name.
  @Test func filtersMatchEveryFormOfAName() throws {
    let symbol = "_ZN2ns5StackIiE4pushERKi"  // ns::Stack<int>::push(int const&)
    // The test binary links the C++ runtime (the C++ fixtures): __cxa_demangle is there.
    try #require(Demangler.demangle(symbol) == "ns::Stack<int>::push(int const&)")
    for pattern in ["_ZN2ns5StackIiE4pushERKi", "ns::Stack<int>::push", "ns::Stack::push", "ns::*::push"] {
      #expect(try NameMatcher(pattern, kind: .glob).matchesFunction(symbol), "\(pattern)")
    }
    #expect(try !NameMatcher("ns::Stack::pop", kind: .glob).matchesFunction(symbol))
    #expect(try NameMatcher("^ns::Stack::push$", kind: .regex).matchesFunction(Demangler.demangle(symbol)))
  }

  /// A library call (`NAME@plt`) is shown and matched as its function is, with the suffix.
  @Test func aLibraryCallIsNamedAsItsFunction() throws {
    let call = "_ZNSt13runtime_errorC1EPKc@plt"
    #expect(Demangler.name(call, style: .simple) == "std::runtime_error::runtime_error@plt")
    #expect(Demangler.name(call, style: .full) == "std::runtime_error::runtime_error(char const*)@plt")
    #expect(Demangler.name(call, style: .no) == call)
    #expect(Demangler.name("printf@plt", style: .simple) == "printf@plt")
    // Readers match the demangled names they hold.
    let held = Demangler.demangle(call)
    for pattern in ["std::runtime_error::runtime_error@plt", "std::runtime_error::runtime_error(char const*)@plt"] {
      #expect(try NameMatcher(pattern, kind: .glob).matchesFunction(held), "\(pattern)")
      #expect(try NameMatcher(pattern, kind: .glob).matchesFunction(call), "\(pattern)")
    }
    #expect(try !NameMatcher("std::runtime_error::runtime_error", kind: .glob).matchesFunction(held))
  }
}
