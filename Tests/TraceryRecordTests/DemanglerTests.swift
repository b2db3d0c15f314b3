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
  ])
  func simplifiedNames(full: String, simple: String) {
    #expect(Demangler.simplified(full) == simple)
  }

  @Test func stylesOfAMangledName() {
    #expect(Demangler.name("_Z5afteri", style: .no) == "_Z5afteri")
    #expect(Demangler.name("main", style: .simple) == "main")
    // __cxa_demangle is there when the test binary links the C++ runtime; without it the
    // symbol comes back unchanged, which every style must then show as is.
    let full = Demangler.name("_Z5afteri", style: .full)
    #expect(full == "after(int)" || full == "_Z5afteri")
    #expect(Demangler.name("_Z5afteri", style: .simple) == (full == "after(int)" ? "after" : "_Z5afteri"))
  }
}
